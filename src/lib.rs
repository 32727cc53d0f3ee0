pub mod config;
pub mod lineproto;
pub mod queue;
