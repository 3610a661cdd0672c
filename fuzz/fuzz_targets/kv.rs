//! Fuzz target: the disk tier's page-table decoder and page reader, through `hga_host::kv::disk::fuzz_entry` (see
//! its doc for the input format: a 4-byte length, the page table, the page file's bytes). Garbage must give a K/V
//! error, never a panic or a page accepted with a wrong checksum.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = hga_host::kv::disk::fuzz_entry(data);
});
