//! Password hashes and their verification.
//!
//! Client passwords are stored only as Argon2 PHC strings. Argon2 is deliberately slow
//! (tens of milliseconds), far too slow to run on every request of a BI tool that sends
//! hundreds of small queries, so a successful verification is remembered as an HMAC of the
//! password under a key that exists only in this process's memory. Later requests with the
//! same password are checked against that tag in constant time (about a microsecond). A
//! changed password, a new hash in the config or a restart all fall back to Argon2.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHasher, SaltString};
use argon2::{Argon2, PasswordHash, PasswordVerifier};
use ring::hmac;
use tokio::sync::Semaphore;

/// Hashes a password for the config (`chgate passwd`): Argon2id with the crate's defaults
/// (19 MiB, 2 passes, 1 lane: the OWASP recommendation) and a random salt.
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut OsRng);
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

/// The stored hash of one user plus the tag of the last password that verified.
pub struct PasswordCheck {
    phc: Arc<str>,
    verified: ArcSwapOption<hmac::Tag>,
    /// Held while this user's hash is being verified. A BI tool opening 64 connections at
    /// once then pays for one Argon2 run, not 64: the others wait, then take the fast path.
    slow: Arc<tokio::sync::Mutex<()>>,
}

impl PasswordCheck {
    /// `phc` must already have been validated as an Argon2 PHC string.
    pub fn new(phc: &str) -> Self {
        Self {
            phc: phc.into(),
            verified: ArcSwapOption::empty(),
            slow: Arc::default(),
        }
    }

    fn fast(&self, key: &hmac::Key, password: &str) -> bool {
        self.verified
            .load()
            .as_deref()
            .is_some_and(|tag| hmac::verify(key, password.as_bytes(), tag.as_ref()).is_ok())
    }

    pub fn phc(&self) -> &str {
        &self.phc
    }

    /// A copy for the next config generation that keeps the remembered verification.
    pub fn clone_for_reload(&self) -> Self {
        Self {
            phc: self.phc.clone(),
            verified: ArcSwapOption::new(self.verified.load_full()),
            slow: Arc::default(),
        }
    }
}

/// Verifies passwords: fast path against remembered tags, slow path on a blocking thread
/// with a bounded number of Argon2 runs at once.
pub struct Verifier {
    key: hmac::Key,
    slow: Arc<Semaphore>,
    /// Verified against for unknown users, so that "no such user" takes as long as "wrong
    /// password" and response times do not reveal which names exist.
    decoy: Arc<str>,
}

impl Verifier {
    pub fn new(max_concurrent: usize) -> Self {
        let rng = ring::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)
            .expect("the system random source is available");
        let decoy = hash_password("chgate decoy password").expect("hashing a constant works");
        Self {
            key,
            slow: Arc::new(Semaphore::new(max_concurrent.max(1))),
            decoy: decoy.into(),
        }
    }

    /// The fast path alone: true if `password` is the one that last verified for `check`.
    /// No allocation, no lock, about a microsecond.
    pub fn verify_cached(&self, check: &PasswordCheck, password: &str) -> bool {
        check.fast(&self.key, password)
    }

    /// True if `password` matches. Allocation-free when this password verified before.
    pub async fn verify(&self, check: &PasswordCheck, password: &str) -> bool {
        if self.verify_cached(check, password) {
            return true;
        }
        let _one_at_a_time = check.slow.lock().await;
        // Racing: another request may have verified this password while we waited.
        if check.fast(&self.key, password) {
            return true;
        }
        if !self.slow_verify(check.phc.clone(), password).await {
            return false;
        }
        let tag = hmac::sign(&self.key, password.as_bytes());
        check.verified.store(Some(Arc::new(tag)));
        true
    }

    /// Spends the same effort as a real verification, then fails.
    pub async fn reject_unknown(&self, password: &str) {
        self.slow_verify(self.decoy.clone(), password).await;
    }

    async fn slow_verify(&self, phc: Arc<str>, password: &str) -> bool {
        let Ok(_permit) = self.slow.clone().acquire_owned().await else {
            return false;
        };
        let password = password.to_owned();
        tokio::task::spawn_blocking(move || {
            PasswordHash::new(&phc)
                .map(|h| {
                    Argon2::default()
                        .verify_password(password.as_bytes(), &h)
                        .is_ok()
                })
                .unwrap_or(false)
        })
        .await
        .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn verifies_and_remembers() {
        let hash = hash_password("bi-pass").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        let check = PasswordCheck::new(&hash);
        let v = Verifier::new(2);
        assert!(!v.verify(&check, "wrong").await);
        assert!(check.verified.load().is_none());
        assert!(v.verify(&check, "bi-pass").await);
        assert!(check.verified.load().is_some());
        // Fast path still refuses a different password and still accepts the right one.
        assert!(!v.verify(&check, "bi-pass2").await);
        assert!(v.verify(&check, "bi-pass").await);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_first_logins_verify_once() {
        let check = Arc::new(PasswordCheck::new(&hash_password("pw").unwrap()));
        let v = Arc::new(Verifier::new(4));
        let start = std::time::Instant::now();
        let one = {
            let (c, v) = (check.clone(), v.clone());
            tokio::spawn(async move { v.verify(&c, "pw").await })
                .await
                .unwrap()
        };
        let single = start.elapsed();
        assert!(one);
        // Reset, then 16 at once: about one Argon2 run, not 16.
        check.verified.store(None);
        let start = std::time::Instant::now();
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (c, v) = (check.clone(), v.clone());
                tokio::spawn(async move { v.verify(&c, "pw").await })
            })
            .collect();
        for t in tasks {
            assert!(t.await.unwrap());
        }
        assert!(
            start.elapsed() < single * 6,
            "{:?} vs one run {:?}",
            start.elapsed(),
            single
        );
    }

    #[tokio::test]
    async fn a_garbage_hash_never_verifies() {
        let check = PasswordCheck::new("not a hash");
        assert!(!Verifier::new(1).verify(&check, "").await);
    }
}
