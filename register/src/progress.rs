/// Progress reporting for long uploads. The mkimage binary plugs a progress bar in.
pub trait Progress: Send + Sync {
    /// A new phase starts; `total_bytes` is 0 when unknown.
    fn start(&self, what: &str, total_bytes: u64);
    /// `bytes` more were processed in the current phase.
    fn advance(&self, bytes: u64);
    /// The current phase ended.
    fn finish(&self);
}

/// A [`Progress`] that reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _what: &str, _total_bytes: u64) {}
    fn advance(&self, _bytes: u64) {}
    fn finish(&self) {}
}
