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
/// until `stop`; the store is closed when it returns. A failure (PostgreSQL or the broker
/// away, the store not opened) is logged and tried again at the next turn, with a new
/// connection: a standby that stopped following would take over with a full rebuild.
pub async fn run(
    cfg: Arc<ValidatedCdc>,
    standing_by: CancellationToken,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    tokio::select! {
        _ = standing_by.cancelled() => {}
        _ = stop.cancelled() => return Ok(()),
    }
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
    let mut sources: Option<Sources> = None;
    let mut store: Option<Store> = None;
    loop {
        match turn(&cfg, &mut sources, &mut store, &halt).await {
            Ok(Some((events, rows))) => tracing::info!(
                events,
                rows,
                "Folded the topics into this standby's store from their start"
            ),
            Ok(None) => {}
            Err(e) => {
                // Connected again at the next turn.
                sources = None;
                tracing::warn!(error = %format!("{e:#}"), "Cannot fold the topics into this standby's store; trying again");
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(EVERY) => {}
        }
    }
}

/// What a fold reads: the catalog (for the slot's restart LSN) and the captured tables'
/// topics.
struct Sources {
    catalog: tokio_postgres::Client,
    topics: Arc<Vec<TopicOf>>,
}

impl Sources {
    async fn connect(cfg: &Arc<ValidatedCdc>) -> anyhow::Result<Self> {
        let c = &cfg.config;
        let catalog = catalog::connect(cfg)
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
        let topics = Arc::new(topics_of(cfg, &schemas, |t| {
            counts
                .iter()
                .find(|(_, name)| name == t)
                .map_or(1, |(n, _)| *n)
        }));
        Ok(Self { catalog, topics })
    }
}

/// One turn: connects and opens the store if they are not yet, then folds what came since
/// the last fold. Returns the events folded and the rows held when the fold started from
/// the topics' start.
async fn turn(
    cfg: &Arc<ValidatedCdc>,
    sources: &mut Option<Sources>,
    store: &mut Option<Store>,
    halt: &Arc<AtomicBool>,
) -> anyhow::Result<Option<(u64, u64)>> {
    let c = &cfg.config.capture;
    if sources.is_none() {
        *sources = Some(Sources::connect(cfg).await?);
    }
    let Some(src) = sources.as_ref() else {
        return Ok(None);
    };
    if store.is_none() {
        *store = Some(
            Store::open(&c.state_dir, c.store_cache_mib << 20)
                .context("opening the key-state store to follow the topics")?,
        );
    }
    let restart = catalog::slot_restart(&src.catalog, &c.slot)
        .await
        .context("reading the slot's restart LSN")?
        .unwrap_or(0);
    let mut s = store.take().context("the store is away")?;
    let (cfg2, topics, halt2) = (cfg.clone(), src.topics.clone(), halt.clone());
    let (s, r) = tokio::task::spawn_blocking(move || {
        let r = fold_once(&cfg2, &topics, restart, &mut s, &halt2);
        (s, r)
    })
    .await?;
    *store = Some(s);
    let (events, rows, went_on) = r?;
    Ok((!went_on).then_some((events, rows)))
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
