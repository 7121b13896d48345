//! rxflow: the embedded all-in-one runner and admin commands. The binary (`src/main.rs`) parses
//! the command line; the commands live here so tests can drive them.

pub mod audit;
pub mod bulk;
pub mod commands;
pub mod pipeline;
pub mod report;
pub mod serve;
pub mod token;
