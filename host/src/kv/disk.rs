//! The disk tier: the arena as a RAM cache over checksummed page files in a user-named directory.
