//! Password hashes and their verification.
//!
//! Client passwords are stored only as Argon2 PHC strings. Argon2 is deliberately slow
//! (tens of milliseconds), far too slow to run on every request of a BI tool that sends
//! hundreds of small queries, so a successful verification is remembered as an HMAC of the
//! password under a key that exists only in this process's memory. Later requests with the
//! same password are checked against that tag in constant time (about a microsecond). A
//! changed password, a new hash in the config or a restart all fall back to Argon2.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwapOption;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHasher, SaltString};
use argon2::{Argon2, PasswordHash, PasswordVerifier};
use ring::hmac;
use tokio::sync::{OnceCell, Semaphore};

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
}

impl PasswordCheck {
    /// `phc` must already have been validated as an Argon2 PHC string.
    pub fn new(phc: &str) -> Self {
        Self {
            phc: phc.into(),
            verified: ArcSwapOption::empty(),
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
    /// Argon2 runs under way, by a keyed hash of (user name, hash, password). Attempts
    /// presenting the same name and password at once share one run (a BI tool opening 64
    /// connections pays for one, not 64); different passwords never wait for each other,
    /// for a known user as for an unknown one, so neither the time two attempts take nor
    /// a queue of wrong ones tells a name or delays its owner.
    running: Mutex<HashMap<[u8; 32], Arc<OnceCell<bool>>>>,
}

/// One attempt's share of an Argon2 run; the run is forgotten when it has a result or
/// nobody waits for it any more.
struct Share<'a> {
    running: &'a Mutex<HashMap<[u8; 32], Arc<OnceCell<bool>>>>,
    key: [u8; 32],
    cell: Arc<OnceCell<bool>>,
}

impl Drop for Share<'_> {
    fn drop(&mut self) {
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        let ours = running
            .get(&self.key)
            .is_some_and(|c| Arc::ptr_eq(c, &self.cell));
        // Shares are made and dropped under the lock: the count is stable here. Two
        // references (the map's and this one) mean nobody else waits.
        if ours && (self.cell.initialized() || Arc::strong_count(&self.cell) == 2) {
            running.remove(&self.key);
        }
    }
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
            running: Mutex::default(),
        }
    }

    /// The fast path alone: true if `password` is the one that last verified for `check`.
    /// No allocation, no lock, about a microsecond.
    pub fn verify_cached(&self, check: &PasswordCheck, password: &str) -> bool {
        check.fast(&self.key, password)
    }

    /// True if `password` matches `name`'s `check`. Allocation-free when this password
    /// verified before.
    pub async fn verify(&self, name: &str, check: &PasswordCheck, password: &str) -> bool {
        if self.verify_cached(check, password) {
            return true;
        }
        if !self.shared_run(name, &check.phc, password).await {
            return false;
        }
        let tag = hmac::sign(&self.key, password.as_bytes());
        check.verified.store(Some(Arc::new(tag)));
        true
    }

    /// Spends the same effort as a real verification of `name`, then fails.
    pub async fn reject_unknown(&self, name: &str, password: &str) {
        let decoy = self.decoy.clone();
        self.shared_run(name, &decoy, password).await;
    }

    /// Verifies `password` against `phc`, sharing the run with attempts that present the
    /// same name and password at the same time.
    async fn shared_run(&self, name: &str, phc: &Arc<str>, password: &str) -> bool {
        let mut ctx = hmac::Context::with_key(&self.key);
        for part in [name.as_bytes(), phc.as_bytes(), password.as_bytes()] {
            ctx.update(&(part.len() as u64).to_le_bytes());
            ctx.update(part);
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(&ctx.sign().as_ref()[..32]);
        let share = {
            let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
            Share {
                running: &self.running,
                key,
                cell: running.entry(key).or_default().clone(),
            }
        };
        *share
            .cell
            .get_or_init(|| self.slow_verify(phc.clone(), password))
            .await
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
        assert!(!v.verify("u", &check, "wrong").await);
        assert!(check.verified.load().is_none());
        assert!(v.verify("u", &check, "bi-pass").await);
        assert!(check.verified.load().is_some());
        // Fast path still refuses a different password and still accepts the right one.
        assert!(!v.verify("u", &check, "bi-pass2").await);
        assert!(v.verify("u", &check, "bi-pass").await);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_first_logins_verify_once() {
        let check = Arc::new(PasswordCheck::new(&hash_password("pw").unwrap()));
        let v = Arc::new(Verifier::new(4));
        let start = std::time::Instant::now();
        let one = {
            let (c, v) = (check.clone(), v.clone());
            tokio::spawn(async move { v.verify("u", &c, "pw").await })
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
                tokio::spawn(async move { v.verify("u", &c, "pw").await })
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
        assert!(!Verifier::new(1).verify("u", &check, "").await);
    }

    /// Runs `attempts` at once (name, password) against `check`, and tells whether two
    /// Argon2 runs were seen under way together (both permits of a 2-permit verifier
    /// taken) before they all ended.
    async fn ran_side_by_side(attempts: &[(&'static str, &'static str)], known: bool) -> bool {
        let check = Arc::new(PasswordCheck::new(&hash_password("pw").unwrap()));
        let v = Arc::new(Verifier::new(2));
        let tasks: Vec<_> = attempts
            .iter()
            .map(|&(name, password)| {
                let (c, v) = (check.clone(), v.clone());
                tokio::spawn(async move {
                    if known {
                        v.verify(name, &c, password).await;
                    } else {
                        v.reject_unknown(name, password).await;
                    }
                })
            })
            .collect();
        let mut together = false;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !tasks.iter().all(|t| t.is_finished()) {
            assert!(
                std::time::Instant::now() < deadline,
                "attempts still running"
            );
            together |= v.slow.available_permits() == 0;
            tokio::time::sleep(std::time::Duration::from_micros(200)).await;
        }
        assert!(v.running.lock().unwrap().is_empty(), "runs forgotten");
        together
    }

    /// Two wrong passwords at once run side by side, for a known user as for an unknown
    /// one: before, a known user's attempts queued one behind the other (2T against T,
    /// which told which names exist, and let a flood of wrong attempts delay the owner).
    /// The same name and password at once share one run, known or not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn attempts_wait_only_for_the_same_name_and_password() {
        let different = [("u", "wrong-1"), ("u", "wrong-2")];
        assert!(ran_side_by_side(&different, true).await, "known user");
        assert!(ran_side_by_side(&different, false).await, "unknown user");
        let same = [("u", "wrong"), ("u", "wrong")];
        assert!(!ran_side_by_side(&same, true).await, "known user");
        assert!(!ran_side_by_side(&same, false).await, "unknown user");
    }
}
