//! What a node is picked for.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Read,
    Write,
}

impl Purpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Read => "read",
            Purpose::Write => "write",
        }
    }

    pub fn index(self) -> usize {
        match self {
            Purpose::Read => 0,
            Purpose::Write => 1,
        }
    }
}
