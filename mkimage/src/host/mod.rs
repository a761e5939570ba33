//! The host layer: everything that touches the build machine goes through here.
//!
//! Every resource that must be released — a mount, a loop device, a chroot's bind
//! mounts, a temporary output file, a qemu process — is held by a guard whose `Drop`
//! releases it, so cleanup happens on success, on error, on panic and (through
//! [`signals`]) on SIGINT/SIGTERM, in reverse order of acquisition.

pub mod chroot;
pub mod cmd;
pub mod fsutil;
pub mod loopdev;
pub mod mount;
pub mod signals;

pub use chroot::ChrootSession;
pub use cmd::{Cmd, CmdError};
pub use loopdev::LoopDevice;
pub use mount::MountGuard;
