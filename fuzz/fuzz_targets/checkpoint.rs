//! Fuzz target: config.json + index + safetensors header parsing and tensor validation of the checkpoint reader,
//! through `hga_host::model::checkpoint::fuzz_entry` (see its doc for the input format: parts split at 0xFF).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = hga_host::model::checkpoint::fuzz_entry(data);
});
