//! Registers built images with clouds.
//!
//! * [`register_ec2`]: uploads a raw image straight into an EBS snapshot (EBS direct
//!   APIs, zero blocks skipped, per-block and aggregate SHA-256 checksums) or through
//!   S3 + ImportSnapshot, then registers an HVM AMI from the snapshot.
//! * [`register_openstack`]: authenticates with Keystone v3, uploads the image to
//!   Glance v2 (streamed) and checks that the MD5 and SHA-512 Glance computed are the
//!   ones computed here while streaming.
//!
//! The result records derive `Serialize` so they can be stored in the build
//! manifest's `registrations` array.

pub mod cli;
pub mod ec2;
mod error;
mod image;
pub mod journal;
pub mod openstack;
mod progress;

pub use ec2::{register_ec2, BootMode, Ec2Options, Ec2Registration, StaticCredentials, Via};
pub use error::RegisterError;
pub use image::ImageInfo;
pub use openstack::{register_openstack, AuthConfig, GlanceRegistration, OpenStackOptions};
pub use progress::{NoProgress, Progress};

/// Tag key put on every cloud resource this crate creates.
pub const BUILD_ID_TAG: &str = "mkimage:build-id";

/// Returns true when the environment variable is set to a true-ish value.
pub(crate) fn env_flag(name: &str) -> bool {
    matches!(
        std::env::var(name).ok().as_deref().map(str::trim),
        Some("1") | Some("true") | Some("yes") | Some("on")
    )
}
