//! The current version of a plugin, swappable while messages run.

use super::Plugin;
use arc_swap::ArcSwap;
use std::sync::Arc;

/// Holds the version of a plugin new messages go to. A message takes the
/// current version once, when it starts, and keeps it to the end: a swap
/// lets in-flight messages finish on the old version, which is dropped when
/// the last of them settles.
pub struct PluginSlot {
    current: ArcSwap<Plugin>,
}

impl PluginSlot {
    pub fn new(plugin: Arc<Plugin>) -> Self {
        Self {
            current: ArcSwap::new(plugin),
        }
    }

    /// The version a message starting now runs on.
    pub fn current(&self) -> Arc<Plugin> {
        self.current.load_full()
    }

    /// Makes `plugin` the version new messages run on; returns the old one.
    pub fn swap(&self, plugin: Arc<Plugin>) -> Arc<Plugin> {
        self.current.swap(plugin)
    }
}
