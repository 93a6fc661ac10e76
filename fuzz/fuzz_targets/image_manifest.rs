//! An image's manifest.json (on disk, possibly damaged or tampered
//! with): read or refused, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &[u8]| {
    let _ = serde_json::from_slice::<quetzal_image::Manifest>(text);
});
