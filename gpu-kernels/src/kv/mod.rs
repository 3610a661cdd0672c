//! The GPU working-set cache of K/V group slots: page-table lookup, gather from the mapped host arena, append.
