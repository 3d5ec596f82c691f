#![no_main]
//! See `sluice::fuzzing::inbound`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice::fuzzing::inbound(data));
