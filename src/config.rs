//! placeholder until the config module lands
use std::time::Duration;
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability { Fsync, Os }
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull { DropOldest, Reject }
pub struct _X(Duration);
