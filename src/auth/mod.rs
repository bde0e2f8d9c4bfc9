//! Client passwords, protocol-free: Argon2id hashes with a fast path for a password that
//! verified once ([`password`]), and slowing down addresses that keep failing
//! ([`throttle`]). How credentials travel is each frontend's business; the gateway decides
//! with these.

pub mod password;
pub mod throttle;

pub use password::{hash_password, PasswordCheck, Verifier};
pub use throttle::Throttle;
