#![no_main]
// The entry point and what it covers: dstack_mesh::fuzz::TARGETS.
libfuzzer_sys::fuzz_target!(|data: &[u8]| dstack_mesh::fuzz::run("acme_answer", data));
