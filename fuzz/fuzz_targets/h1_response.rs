#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    trellis_proxy::fuzz::h1_response(data);
});
