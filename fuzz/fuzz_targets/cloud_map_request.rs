#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    trellis_discovery::fuzz::cloud_map_request(data);
});
