//! Deserialization helpers shared by the config file and the broker
//! adapters' own settings (which the config embeds but does not know).

pub mod duration;
