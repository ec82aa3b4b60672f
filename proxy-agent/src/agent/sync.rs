//! Syncing: the store through translation and reconcile into the maps, full
//! or incremental, and what a sync reports (logs, metrics, health, flows to
//! forget, `CONFIG`'s ClusterIP range).

use std::{collections::BTreeSet, time::Instant};

use super::Agent;
use crate::{
    conntrack,
    metrics::{MapFill, SyncKind},
    programmed::Op,
    reconcile::Batch,
    store::Dirty,
};

impl Agent {
    /// Runs a batch against the maps; on failure rebuilds the reconciler from
    /// what the maps really hold so the next sync repairs it.
    fn apply(&mut self, batch: Batch, started: Instant, kind: SyncKind, changes: usize) {
        let planned = started.elapsed();
        for (svc, why) in &batch.refused {
            tracing::error!(service = %svc, "not programmed: {why}");
        }
        let applying = Instant::now();
        let result = self.dp.apply(&batch.ops, batch.tables_not_before);
        let dp_ms = applying.elapsed().as_secs_f64() * 1e3;
        let ok = match result {
            Ok(()) => {
                self.reconciler.applied(Instant::now());
                true
            }
            Err((index, e)) => {
                tracing::error!(
                    op = ?batch.ops.get(index),
                    "applying failed after {index} of {} operations: {e}; will resync",
                    batch.ops.len()
                );
                self.rebuild_reconciler();
                false
            }
        };
        self.health.synced(ok);
        let frontends_changed = batch
            .ops
            .iter()
            .any(|o| matches!(o, Op::SetService(..) | Op::DelService(_)));
        if kind == SyncKind::Full || frontends_changed {
            self.node.set_cluster_ips(&self.reconciler.maps().services);
            self.node
                .set_nodeport_address(self.engine.nodeport_address());
            self.write_config();
        }
        self.metrics.record_sync(
            kind,
            started.elapsed(),
            ok,
            batch.refused.len(),
            self.fill(),
        );
        let (internal, external) = self.engine.no_local_endpoints();
        self.metrics.record_no_local_endpoints(internal, external);
        if ok && (!batch.left.is_empty() || !batch.gone.is_empty()) {
            let mut departed = batch.left_addrs;
            departed.extend(&batch.gone);
            super::sockets::forget(&self.dp, self.socket_lb, departed);
            conntrack::gc::forget_flows(&self.dp, &self.metrics, batch.left, batch.gone);
        }
        let maps = self.reconciler.maps();
        let (blocks, _) = self.reconciler.selection_usage();
        tracing::info!(
            kind = kind.name(),
            changed_service_ports = changes,
            frontends = maps.services.len(),
            backends = maps.backends.len(),
            selection_bytes = u64::from(blocks) * 64,
            operations = batch.ops.len(),
            plan_ms = planned.as_secs_f64() * 1e3,
            apply_ms = applying.elapsed().as_secs_f64() * 1e3,
            maps_ms = dp_ms,
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "synced"
        );
    }

    /// Entries in use and capacity of the maps the agent writes.
    fn fill(&self) -> Vec<MapFill> {
        let cap = self.reconciler.capacity();
        let maps = self.reconciler.maps();
        let (blocks, block_cap) = self.reconciler.selection_usage();
        let ranges: usize = maps.ranges.values().map(BTreeSet::len).sum();
        let fill = |map, used: usize, capacity: u32| MapFill {
            map,
            used: used as u64,
            capacity: u64::from(capacity),
        };
        vec![
            fill("SERVICES", maps.services.len(), cap.frontends),
            fill(
                "SVC_TABLE",
                maps.tables.len(),
                cap.services.saturating_sub(1),
            ),
            fill(
                "BACKENDS",
                maps.backends.len(),
                cap.backends.saturating_sub(1),
            ),
            fill("SELECTION", blocks as usize, block_cap),
            fill("SOURCE_RANGES", ranges, cap.ranges),
        ]
    }

    /// Rebuilds the reconciler from what the maps really hold.
    fn rebuild_reconciler(&mut self) {
        match self.dp.read_programmed() {
            Ok(maps) => self.reconciler = self.reconciler.rebuild(maps),
            Err(e) => tracing::error!("reading the maps back: {e}"),
        }
    }

    pub(super) fn log_errors(&self, errors: &[crate::store::ObjectError]) {
        for e in errors {
            tracing::warn!("{e}");
        }
    }

    /// Everything, from the store and the maps as they are now.
    pub(super) fn full_sync(&mut self) {
        let started = Instant::now();
        let update = self.engine.update(&Dirty {
            all: true,
            ..Dirty::default()
        });
        let translated = started.elapsed();
        self.log_errors(&update.new_errors);
        // The first sync plans against the maps as read at load (nothing has
        // written them since); later ones re-read them to catch drift.
        if self.synced {
            self.rebuild_reconciler();
        }
        let read = started.elapsed();
        let desired = self.engine.desired();
        let batch = self.reconciler.full(&desired);
        tracing::debug!(
            translate_ms = translated.as_secs_f64() * 1e3,
            read_maps_ms = (read - translated).as_secs_f64() * 1e3,
            plan_ms = (started.elapsed() - read).as_secs_f64() * 1e3,
            "full sync planned"
        );
        let n = desired.services.len();
        self.health_checks.full(&desired);
        drop(desired);
        self.synced = true;
        self.apply(batch, started, SyncKind::Full, n);
        release_freed_memory();
    }

    /// Applies what a store change touched.
    pub(super) fn store_changed(&mut self, dirty: Dirty) {
        if !self.synced || dirty.is_empty() {
            return;
        }
        let started = Instant::now();
        let update = self.engine.update(&dirty);
        let translated = started.elapsed();
        self.log_errors(&update.new_errors);
        if update.changes.is_empty() {
            return;
        }
        let n = update.changes.len();
        self.health_checks.changes(&update.changes);
        let batch = self.reconciler.changes(&update.changes);
        tracing::debug!(
            translate_us = translated.as_micros() as u64,
            reconcile_us = (started.elapsed() - translated).as_micros() as u64,
            "incremental update planned"
        );
        self.apply(batch, started, SyncKind::Incremental, n);
    }
}

/// A full sync (and the list before it) allocates and frees a lot; glibc keeps
/// freed memory mapped unless asked to give it back.
pub(super) fn release_freed_memory() {
    // SAFETY: malloc_trim only returns free memory to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}
