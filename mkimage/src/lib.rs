//! mkimage: builds, verifies, customizes and registers cloud VM images.
//!
//! Data flow of a build: a [`recipe::Recipe`] (from TOML or the original cfg) goes to
//! [`plan`], which decides the ordered list of [`stage::Stage`]s and their cache keys;
//! [`build`] runs each stage inside host guards ([`host`]), and the output step writes
//! the image under a temporary name, hashes it and renames it into place.

pub mod boot;
pub mod build;
pub mod cache;
pub mod context;
pub mod disk;
pub mod host;
pub mod journal;
pub mod logging;
pub mod manifest;
pub mod ova;
pub mod plan;
pub mod preflight;
pub mod preinstall;
pub mod progress;
pub mod recipe;
pub mod registration;
pub mod scaffold;
pub mod service;
pub mod stage;
pub mod verify;
