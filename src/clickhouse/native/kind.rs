//! The types of the packets a server sends, as the readers here name them (the wire's
//! numbers are read in [`super::server`]).

/// A server packet's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Hello,
    Data,
    Exception,
    Progress,
    Pong,
    EndOfStream,
    ProfileInfo,
    Totals,
    Extremes,
    Log,
    TableColumns,
}
