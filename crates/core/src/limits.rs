//! Every limit that an input, a queue or a retry is held to, in one place.
//!
//! Names carry their unit last (`_bytes_max`, `_ms`). A limit that a user may raise is a
//! default here and a setting in the configuration; the hard ones are constants.

/// Longest key, in bytes of UTF-8.
pub const KEY_BYTES_MAX: usize = 1024;
/// Longest dataset name, in bytes.
pub const DATASET_NAME_BYTES_MAX: usize = 64;
/// Longest region or zone name, in bytes.
pub const PLACE_NAME_BYTES_MAX: usize = 32;
/// Default largest value, in bytes of JSON text (configurable up to `VALUE_BYTES_HARD_MAX`).
pub const VALUE_BYTES_MAX_DEFAULT: usize = 1024 * 1024;
/// No configuration may raise the value limit past this.
pub const VALUE_BYTES_HARD_MAX: usize = 16 * 1024 * 1024;
/// Default and largest page of a key listing.
pub const LIST_LIMIT_DEFAULT: usize = 100;
pub const LIST_LIMIT_MAX: usize = 1000;
/// Most nodes one topology may name.
pub const NODES_MAX: usize = 256;
/// Most regions one topology may name.
pub const REGIONS_MAX: usize = 32;
/// Largest topology file accepted, in bytes.
pub const CONFIG_BYTES_MAX: usize = 1024 * 1024;
/// Default largest distance the HLC may run ahead of the local wall clock.
pub const HLC_MAX_OFFSET_MS_DEFAULT: u64 = 500;
/// Largest simulated one-way WAN delay between two regions.
pub const WAN_ONE_WAY_MS_MAX: u64 = 10_000;
