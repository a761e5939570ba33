//! Stage `resize`: with `optimize = true`, the disk is sized to what the image
//! tree needs plus a configurable headroom, instead of the recipe's size.
//!
//! The original shrank by copying a finished image into a smaller one and deleted
//! the source before checking the copy. Here the filesystem is written from the
//! tree (`mkfs.ext4 -d`) at its final size in the first place, then checked with
//! `e2fsck` before the output is renamed into place, so there is no unshrunk image
//! to lose and no moment without a verified one.

use super::{Ctx, StageOps, StageResult};
use serde_json::json;

/// Free space left in a shrunk filesystem unless the recipe says otherwise.
pub const DEFAULT_HEADROOM_MIB: u64 = 256;

pub struct Resize {
    pub headroom_mib: u64,
    /// The recipe's size: the shrunk disk is never larger.
    pub max_mib: u64,
}

/// Disk size (MiB) for a tree of `tree_bytes` allocated bytes and `headroom` MiB free.
pub fn fitted_size_mib(tree_bytes: u64, headroom_mib: u64) -> u64 {
    let mib = 1024 * 1024;
    // ext4 metadata (inode tables at one 256-byte inode per 16 KiB, bitmaps, group
    // descriptors) stays under 3 %; slack for small files and directories is within
    // the other 7 %. The journal is 16-64 MiB for these sizes.
    let data = (tree_bytes + tree_bytes / 10).div_ceil(mib);
    1 + data + 64 + headroom_mib
}

impl StageOps for Resize {
    fn name(&self) -> String {
        "resize".into()
    }

    fn describe(&self) -> String {
        format!(
            "size the disk to the tree + {} MiB free (at most {} MiB)",
            self.headroom_mib, self.max_mib
        )
    }

    fn inputs(&self) -> serde_json::Value {
        json!({ "headroom_mib": self.headroom_mib, "max_mib": self.max_mib })
    }

    fn run(&self, ctx: &mut Ctx) -> StageResult {
        let tree = crate::host::fsutil::tree_size(&ctx.rootfs);
        let size = fitted_size_mib(tree, self.headroom_mib).min(self.max_mib);
        tracing::info!(
            "image tree {} MiB: disk {} MiB instead of {} MiB",
            tree >> 20,
            size,
            self.max_mib
        );
        ctx.disk_size_mib = Some(size);
        super::fail_point("resize")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn fitted_size_covers_tree_metadata_and_headroom() {
        let s = super::fitted_size_mib(400 << 20, 256);
        assert!(
            (400 + 256 + 64..400 * 12 / 10 + 256 + 64 + 2).contains(&s),
            "{s}"
        );
    }
}
