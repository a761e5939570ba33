use std::path::PathBuf;

/// What is known about the image to register (filled from the build manifest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub path: PathBuf,
    /// Name of the AMI / Glance image.
    pub name: String,
    pub description: Option<String>,
    /// `x86_64` or `i386`.
    pub arch: String,
    /// raw, qcow2, vdi or vmdk.
    pub disk_format: String,
    /// MD5 from the build manifest (hex); checked against the bytes uploaded.
    pub md5: Option<String>,
    /// SHA-256 from the build manifest (hex); checked against the bytes uploaded.
    pub sha256: Option<String>,
    /// Build id; every created resource is tagged with it.
    pub build_id: String,
}

impl ImageInfo {
    pub(crate) fn validate(&self) -> Result<(), crate::RegisterError> {
        let bad = |m: String| Err(crate::RegisterError::Invalid(m));
        if self.name.trim().is_empty() {
            return bad("the image name is empty".into());
        }
        if !matches!(self.arch.as_str(), "x86_64" | "i386") {
            return bad(format!(
                "architecture {:?} is not supported (x86_64 or i386)",
                self.arch
            ));
        }
        if !matches!(self.disk_format.as_str(), "raw" | "qcow2" | "vdi" | "vmdk") {
            return bad(format!(
                "disk format {:?} is not supported (raw, qcow2, vdi or vmdk)",
                self.disk_format
            ));
        }
        if self.build_id.trim().is_empty() {
            return bad("the build id is empty".into());
        }
        Ok(())
    }
}
