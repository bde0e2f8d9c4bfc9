//! What the pipeline's threads pass each other: the tasks they share, the items of a
//! ring, and the commits writers send back to the consumer thread.

use std::sync::Arc;

use crate::ingest::batch::{Message, TaskSpec};
use crate::sink::Target;

/// A task as the pipeline runs it.
pub struct Task {
    pub name: String,
    pub topic: String,
    pub dead_letter_topic: String,
    pub spec: Arc<TaskSpec>,
    pub target: Arc<Target>,
}

pub struct Commit {
    pub task: usize,
    pub partition: i32,
    pub next: i64,
}

/// What travels through a ring: messages, and, in order with them, the news that a
/// partition was taken away (so the worker drops what it holds of it and its writer stops
/// before the next segment: the partition's next owner resumes from the intent).
pub enum Item {
    Message(Message),
    Revoked { task: usize, partition: i32 },
}
