//! Host and disk tier benchmark rows.
pub fn run() {}
