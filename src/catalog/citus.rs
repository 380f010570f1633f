//! What the catalog map learns from a Citus coordinator: the shards of
//! policy tables (refused like partitions) and whether results must be
//! traced through their statement.

use super::*;

/// With `citus.enable_router_execution = off` (the stopgap of earlier
/// releases, no longer needed: results are traced by their statement)
/// Citus sends parameterized queries to every shard, and 13.2 crashes a
/// backend running a generic plan unless `plan_cache_mode` is
/// `force_custom_plan`.
pub(super) async fn warn_of_citus_router_results(
    client: &tokio_postgres::Client,
) -> Result<(), CatalogError> {
    let row = client
        .query_one(
            "SELECT current_setting('citus.enable_router_execution', true), \
                    current_setting('plan_cache_mode')",
            &[],
        )
        .await?;
    let router: Option<String> = row.get(0);
    let plan_cache: String = row.get(1);
    if router.as_deref() == Some("off") {
        tracing::warn!(
            "citus.enable_router_execution is off: no longer needed (cmk-proxy traces router results through their statement) and it sends every parameterized query to all shards; reset it (docs/SCALING-OUT.md)"
        );
        if plan_cache != "force_custom_plan" {
            tracing::warn!(
                "citus.enable_router_execution is off but plan_cache_mode is {plan_cache}: Citus crashes a backend running a generic plan (the sixth execution of a prepared statement); set plan_cache_mode = force_custom_plan or reset citus.enable_router_execution (docs/SCALING-OUT.md)"
            );
        }
    }
    Ok(())
}

/// The shards of policy tables that Citus distributes (or replicates), from
/// its metadata on the coordinator: statements naming a shard are refused
/// like those naming a partition (its cells would be written or read
/// unseen, e.g. on a coordinator that holds shards). Citus's results for a
/// distributed table never name a shard; router results name no table at
/// all (see [`CatalogMap::traces_by_statement`]).
pub(super) async fn refuse_citus_shards(
    client: &tokio_postgres::Client,
    map: &mut CatalogMap,
) -> Result<(), CatalogError> {
    let citus: bool = client
        .query_one(
            "SELECT to_regclass('pg_catalog.pg_dist_shard') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if !citus {
        return Ok(());
    }
    map.citus = true;
    let tables: Vec<u32> = map.table_oids.values().copied().collect();
    let rows = client
        .query(
            "SELECT n.nspname || '.' || (parse_ident(shard_name(s.logicalrelid, s.shardid)))[ \
                    cardinality(parse_ident(shard_name(s.logicalrelid, s.shardid)))], \
                    n.nspname || '.' || c.relname \
             FROM pg_catalog.pg_dist_shard s \
             JOIN pg_catalog.pg_class c ON c.oid = s.logicalrelid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE s.logicalrelid::oid = ANY($1::oid[])",
            &[&tables],
        )
        .await?;
    for row in rows {
        map.facts.children.insert(row.get(0), row.get(1));
    }
    Ok(())
}
