//! A standby that keeps its key-state store current (`coordination.follow`, each instance
//! with a `state_dir` of its own): while it waits for the leadership it folds the topics
//! into its store (`rebuild::catch_up`), from where its last fold stopped, every
//! [`EVERY`]. Taking over then reads only what came since, however big the topics are.
//!
//! Its first fold reads the topics from their start into an emptied store (the store may
//! be a former leader's, behind the topics, or hold events its outbox never sent). Where a
//! fold stopped and what it learned are kept in the store (meta `follow`), so a restarted
//! standby goes on from there. The leader that takes over ends the following (the store
//! is the capture's from then on: `Store::adopt`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use super::catalog;
use super::config::ValidatedCdc;
use super::rebuild::{self, topics_of, TopicOf};
use super::store::Store;

/// How often a standby folds what the topics got since its last fold.
pub const EVERY: Duration = Duration::from_secs(2);

/// Follows the topics from the moment `standing_by` is cancelled (another instance leads)
/// until `stop`; the store is closed when it returns.
pub async fn run(
    cfg: Arc<ValidatedCdc>,
    standing_by: CancellationToken,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    tokio::select! {
        _ = standing_by.cancelled() => {}
        _ = stop.cancelled() => return Ok(()),
    }
    let c = &cfg.config;
    let catalog = catalog::connect(&cfg)
        .await
        .context("connecting to PostgreSQL to follow the topics")?;
    let schemas = catalog::tables(&catalog, &c.capture.tables).await?;
    let k = c.kafka.clone();
    let names: Vec<String> = schemas
        .iter()
        .map(|s| cfg.topic(&s.schema, &s.name))
        .collect();
    let counts = tokio::task::spawn_blocking(move || {
        names
            .into_iter()
            .map(|t| Ok((rebuild::partitions_of(&k.brokers, &k.properties, &t)?, t)))
            .collect::<anyhow::Result<Vec<(i32, String)>>>()
    })
    .await??;
    let topics: Arc<Vec<TopicOf>> = Arc::new(topics_of(&cfg, &schemas, |t| {
        counts
            .iter()
            .find(|(_, name)| name == t)
            .map_or(1, |(n, _)| *n)
    }));
    let mut store = Some(
        Store::open(&c.capture.state_dir, c.capture.store_cache_mib << 20)
            .context("opening the key-state store to follow the topics")?,
    );
    // A fold under way ends at its next message once `stop` comes.
    let halt = Arc::new(AtomicBool::new(false));
    {
        let (halt, stop) = (halt.clone(), stop.clone());
        tokio::spawn(async move {
            stop.cancelled().await;
            halt.store(true, Ordering::Relaxed);
        });
    }
    tracing::info!("Following the topics while standing by");
    loop {
        let restart = catalog::slot_restart(&catalog, &c.capture.slot)
            .await?
            .unwrap_or(0);
        let mut s = store.take().context("the store is away")?;
        let (cfg2, topics2, halt2) = (cfg.clone(), topics.clone(), halt.clone());
        let (s, r) = tokio::task::spawn_blocking(move || {
            let r = fold_once(&cfg2, &topics2, restart, &mut s, &halt2);
            (s, r)
        })
        .await?;
        store = Some(s);
        match r {
            Ok((events, rows, went_on)) if !went_on => tracing::info!(
                events,
                rows,
                "Folded the topics into this standby's store from their start"
            ),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "Cannot fold the topics into this standby's store; trying again")
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(EVERY) => {}
        }
    }
}

/// One fold, its progress kept in the store; returns the events folded so far, the rows
/// the store holds and whether it went on from a saved fold.
fn fold_once(
    cfg: &ValidatedCdc,
    topics: &[TopicOf],
    restart: u64,
    store: &mut Store,
    halt: &AtomicBool,
) -> anyhow::Result<(u64, u64, bool)> {
    let k = &cfg.config.kafka;
    let src = rebuild::Topics {
        brokers: &k.brokers,
        properties: &k.properties,
        topics,
        with_schema: k.with_schema,
    };
    let (follow, went_on) = rebuild::catch_up(&src, restart, store, halt)?;
    store.set_meta_now("follow", Some(&serde_json::to_vec(&follow)?))?;
    Ok((follow.rebuilt.events, follow.rebuilt.rows, went_on))
}
