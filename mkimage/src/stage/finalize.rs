//! Stage `finalize`: leaves no build residue in the image — apt caches and lists,
//! logs of the build, temporary files.

use super::{Ctx, StageOps, StageResult};
use serde_json::json;

pub struct Finalize;

const RESIDUE: &[&str] = &[
    "var/cache/apt/archives",
    "var/lib/apt/lists",
    "var/cache/apt",
    "tmp",
    "var/tmp",
];

impl StageOps for Finalize {
    fn name(&self) -> String {
        "finalize".into()
    }

    fn describe(&self) -> String {
        "remove apt caches and lists, temporary files".into()
    }

    /// A cache layer: its inputs define the tree it leaves.
    fn cacheable(&self) -> bool {
        true
    }

    fn inputs(&self) -> serde_json::Value {
        json!({ "residue": RESIDUE })
    }

    fn run(&self, ctx: &mut Ctx) -> StageResult {
        for dir in RESIDUE {
            let d = ctx.root_path(dir);
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in rd.flatten() {
                let p = e.path();
                // Keep the directory skeleton apt expects (partial/, lock files).
                if p.is_dir() && !p.is_symlink() {
                    if e.file_name() == "partial" || e.file_name() == "auxfiles" {
                        continue;
                    }
                    crate::host::fsutil::remove_tree(&p)?;
                } else if e.file_name() != "lock" {
                    std::fs::remove_file(&p)?;
                }
            }
        }
        super::fail_point("finalize")?;
        Ok(())
    }
}
