//! A line from QEMU's monitor: parsed into a typed message or refused,
//! never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|line: &str| {
    let _ = quetzal_engine::qmp::parse_message(line);
});
