#![no_main]
//! See `sluice::fuzzing::outbound`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice::fuzzing::outbound(data));
