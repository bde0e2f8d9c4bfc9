//! Client authentication: which credentials a request carries ([`credentials`]), whether
//! they match a configured user ([`password`]), and slowing down addresses that keep
//! failing ([`throttle`]).

pub mod credentials;
pub mod password;
pub mod throttle;

pub use credentials::{extract, Credentials, CredentialsError};
pub use password::{hash_password, PasswordCheck, Verifier};
pub use throttle::Throttle;
