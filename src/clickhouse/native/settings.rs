//! The binary form of each query setting ClickHouse 18.16 knows, which a relay needs to step
//! over a Query packet's settings below revision 54429.
//!
//! Below that revision a Query carries its settings as `name` (String), then the value in its
//! type's own binary form, then an empty name. Nothing marks where a value ends: the server
//! reads it with the setting's type, so a relay must know every name's form or lose its place
//! in the stream. ClickHouse 18.16.1 (revision 54412) writes:
//!
//! - unsigned integers, booleans, seconds, milliseconds and `max_threads` (0 meaning auto) as
//!   a VarUInt;
//! - the three signed integers as a zigzag VarInt;
//! - floats (as their decimal text), enums (by name), characters and strings as a
//!   length-prefixed string.
//!
//! Each name's type is from 18.16's `Settings.h` (the `APPLY_FOR_SETTINGS` list) and each
//! type's form from `SettingsCommon.cpp` (its `write`/`set(ReadBuffer &)`).
//!
//! The table holds exactly the 184 names 18.16.1's `system.settings` lists; that table walks
//! the server's whole settings list and hides none. Two names the server takes elsewhere are
//! not settings here: `profile` (a Query carrying it is refused with "Unknown setting
//! profile"), and `enable_conditional_computation`, gone before 18.16.
//!
//! Checked against a live 18.16.1 at revision 54412: each setting sent alone in a Query, in
//! the form below, was read back from `system.settings` with the value sent and marked
//! changed; a signed value of -1 read back as -1 (the zigzag form), and a setting sent in the
//! wrong form was refused or read back wrong.
//!
//! Note: clickhouse-driver writes the signed settings as a plain VarUInt. The framing is the
//! same (both are LEB128), so a relay steps over them either way, but the server reads
//! `distributed_ddl_task_timeout = 180` from that driver as 90.

/// How a setting's value is written in a Query packet below revision 54429.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binary {
    /// VarUInt (UInt64, Bool, Seconds, Milliseconds, MaxThreads with 0 = auto).
    VarUInt,
    /// A zigzag-encoded VarInt (Int64). Framed like [`Binary::VarUInt`]: a walker steps over
    /// it the same way, only the value's meaning differs.
    VarInt,
    /// A length-prefixed string (Float as text, enums by name, String, Char).
    String,
}

/// Every setting of ClickHouse 18.16, sorted by name.
// Invariant: sorted and unique, so `binary_form` can binary-search it (checked by a test).
static SETTINGS: &[(&str, Binary)] = {
    // Local, so the variant `String` shadows the type only in this table.
    use Binary::{String, VarInt, VarUInt};
    &[
        ("add_http_cors_header", VarUInt),
        ("aggregation_memory_efficient_merge_threads", VarUInt),
        ("allow_ddl", VarUInt),
        ("allow_distributed_ddl", VarUInt),
        ("allow_experimental_low_cardinality_type", VarUInt),
        ("asterisk_left_columns_only", VarUInt),
        ("background_pool_size", VarUInt),
        ("background_schedule_pool_size", VarUInt),
        ("calculate_text_stack_trace", VarUInt),
        ("compile", VarUInt),
        ("compile_expressions", VarUInt),
        ("connect_timeout", VarUInt),
        ("connect_timeout_with_failover_ms", VarUInt),
        ("connections_with_failover_max_tries", VarUInt),
        ("count_distinct_implementation", String),
        ("date_time_input_format", String), // an enum, by name
        ("decimal_check_overflow", VarUInt),
        ("distinct_overflow_mode", String), // an enum, by name
        ("distributed_aggregation_memory_efficient", VarUInt),
        ("distributed_connections_pool_size", VarUInt),
        ("distributed_ddl_task_timeout", VarInt), // a signed integer
        ("distributed_directory_monitor_batch_inserts", VarUInt),
        ("distributed_directory_monitor_sleep_time_ms", VarUInt),
        ("distributed_group_by_no_merge", VarUInt),
        ("distributed_product_mode", String), // an enum, by name
        ("empty_result_for_aggregation_by_empty_set", VarUInt),
        ("enable_debug_queries", VarUInt),
        ("enable_http_compression", VarUInt),
        ("enable_optimize_predicate_expression", VarUInt),
        ("extremes", VarUInt),
        (
            "fallback_to_stale_replicas_for_distributed_queries",
            VarUInt,
        ),
        ("force_index_by_date", VarUInt),
        ("force_primary_key", VarUInt),
        ("format_csv_allow_double_quotes", VarUInt),
        ("format_csv_allow_single_quotes", VarUInt),
        ("format_csv_delimiter", String), // one character
        ("format_schema", String),
        ("fsync_metadata", VarUInt),
        ("group_by_overflow_mode", String), // an enum, by name
        ("group_by_two_level_threshold", VarUInt),
        ("group_by_two_level_threshold_bytes", VarUInt),
        ("http_connection_timeout", VarUInt),
        ("http_headers_progress_interval_ms", VarUInt),
        ("http_max_multipart_form_data_size", VarUInt),
        (
            "http_native_compression_disable_checksumming_on_decompress",
            VarUInt,
        ),
        ("http_receive_timeout", VarUInt),
        ("http_send_timeout", VarUInt),
        ("http_zlib_compression_level", VarInt), // a signed integer
        ("input_format_allow_errors_num", VarUInt),
        ("input_format_allow_errors_ratio", String), // a float, as text
        ("input_format_import_nested_json", VarUInt),
        ("input_format_skip_unknown_fields", VarUInt),
        ("input_format_values_interpret_expressions", VarUInt),
        ("insert_allow_materialized_columns", VarUInt),
        ("insert_deduplicate", VarUInt),
        ("insert_distributed_sync", VarUInt),
        ("insert_distributed_timeout", VarUInt),
        ("insert_quorum", VarUInt),
        ("insert_quorum_timeout", VarUInt),
        ("insert_sample_with_metadata", VarUInt),
        ("interactive_delay", VarUInt),
        ("join_default_strictness", String), // an enum, by name
        ("join_overflow_mode", String),      // an enum, by name
        ("join_use_nulls", VarUInt),
        ("load_balancing", String), // an enum, by name
        ("log_profile_events", VarUInt),
        ("log_queries", VarUInt),
        ("log_queries_cut_to_length", VarUInt),
        ("log_query_settings", VarUInt),
        ("log_query_threads", VarUInt),
        ("low_cardinality_allow_in_native_format", VarUInt),
        ("low_cardinality_max_dictionary_size", VarUInt),
        ("low_cardinality_use_single_dictionary_for_part", VarUInt),
        ("mark_cache_min_lifetime", VarUInt),
        ("max_ast_depth", VarUInt),
        ("max_ast_elements", VarUInt),
        ("max_block_size", VarUInt),
        ("max_bytes_before_external_group_by", VarUInt),
        ("max_bytes_before_external_sort", VarUInt),
        ("max_bytes_before_remerge_sort", VarUInt),
        ("max_bytes_in_distinct", VarUInt),
        ("max_bytes_in_join", VarUInt),
        ("max_bytes_in_set", VarUInt),
        ("max_bytes_to_read", VarUInt),
        ("max_bytes_to_sort", VarUInt),
        ("max_bytes_to_transfer", VarUInt),
        ("max_columns_to_read", VarUInt),
        ("max_compress_block_size", VarUInt),
        ("max_concurrent_queries_for_user", VarUInt),
        ("max_distributed_connections", VarUInt),
        ("max_execution_time", VarUInt),
        ("max_expanded_ast_elements", VarUInt),
        ("max_fetch_partition_retries_count", VarUInt),
        ("max_insert_block_size", VarUInt),
        ("max_memory_usage", VarUInt),
        ("max_memory_usage_for_all_queries", VarUInt),
        ("max_memory_usage_for_user", VarUInt),
        ("max_network_bandwidth", VarUInt),
        ("max_network_bandwidth_for_all_users", VarUInt),
        ("max_network_bandwidth_for_user", VarUInt),
        ("max_network_bytes", VarUInt),
        ("max_parallel_replicas", VarUInt),
        ("max_pipeline_depth", VarUInt),
        ("max_query_size", VarUInt),
        ("max_read_buffer_size", VarUInt),
        ("max_replica_delay_for_distributed_queries", VarUInt),
        ("max_result_bytes", VarUInt),
        ("max_result_rows", VarUInt),
        ("max_rows_in_distinct", VarUInt),
        ("max_rows_in_join", VarUInt),
        ("max_rows_in_set", VarUInt),
        ("max_rows_to_group_by", VarUInt),
        ("max_rows_to_read", VarUInt),
        ("max_rows_to_sort", VarUInt),
        ("max_rows_to_transfer", VarUInt),
        ("max_streams_to_max_threads_ratio", String), // a float, as text
        ("max_subquery_depth", VarUInt),
        ("max_temporary_columns", VarUInt),
        ("max_temporary_non_const_columns", VarUInt),
        ("max_threads", VarUInt),
        ("memory_tracker_fault_probability", String), // a float, as text
        ("merge_tree_coarse_index_granularity", VarUInt),
        ("merge_tree_max_rows_to_use_cache", VarUInt),
        ("merge_tree_min_rows_for_concurrent_read", VarUInt),
        ("merge_tree_min_rows_for_seek", VarUInt),
        ("merge_tree_uniform_read_distribution", VarUInt),
        ("min_bytes_to_use_direct_io", VarUInt),
        ("min_compress_block_size", VarUInt),
        ("min_count_to_compile", VarUInt),
        ("min_execution_speed", VarUInt),
        ("min_insert_block_size_bytes", VarUInt),
        ("min_insert_block_size_rows", VarUInt),
        ("mysql_max_rows_to_insert", VarUInt),
        ("network_compression_method", String), // an enum, by name
        ("network_zstd_compression_level", VarInt), // a signed integer
        ("odbc_max_field_size", VarUInt),
        ("optimize_min_equality_disjunction_chain_length", VarUInt),
        ("optimize_move_to_prewhere", VarUInt),
        ("optimize_throw_if_noop", VarUInt),
        ("output_format_json_escape_forward_slashes", VarUInt),
        ("output_format_json_quote_64bit_integers", VarUInt),
        ("output_format_json_quote_denormals", VarUInt),
        ("output_format_pretty_color", VarUInt),
        ("output_format_pretty_max_column_pad_width", VarUInt),
        ("output_format_pretty_max_rows", VarUInt),
        ("output_format_write_statistics", VarUInt),
        ("parallel_replica_offset", VarUInt),
        ("parallel_replicas_count", VarUInt),
        ("parallel_view_processing", VarUInt),
        ("poll_interval", VarUInt),
        ("prefer_localhost_replica", VarUInt),
        ("preferred_block_size_bytes", VarUInt),
        ("preferred_max_column_in_block_size_bytes", VarUInt),
        ("priority", VarUInt),
        ("queue_max_wait_ms", VarUInt),
        ("read_backoff_max_throughput", VarUInt),
        ("read_backoff_min_events", VarUInt),
        ("read_backoff_min_interval_between_events_ms", VarUInt),
        ("read_backoff_min_latency_ms", VarUInt),
        ("read_overflow_mode", String), // an enum, by name
        ("readonly", VarUInt),
        ("receive_timeout", VarUInt),
        ("replace_running_query", VarUInt),
        ("replication_alter_columns_timeout", VarUInt),
        ("replication_alter_partitions_sync", VarUInt),
        ("result_overflow_mode", String), // an enum, by name
        ("select_sequential_consistency", VarUInt),
        ("send_logs_level", String), // a log level, by name
        ("send_progress_in_http_headers", VarUInt),
        ("send_timeout", VarUInt),
        ("set_overflow_mode", String), // an enum, by name
        ("skip_unavailable_shards", VarUInt),
        ("sort_overflow_mode", String), // an enum, by name
        ("stream_flush_interval_ms", VarUInt),
        ("table_function_remote_max_addresses", VarUInt),
        ("tcp_keep_alive_timeout", VarUInt),
        ("timeout_before_checking_execution_speed", VarUInt),
        ("timeout_overflow_mode", String),  // an enum, by name
        ("totals_auto_threshold", String),  // a float, as text
        ("totals_mode", String),            // an enum, by name
        ("transfer_overflow_mode", String), // an enum, by name
        ("use_client_time_zone", VarUInt),
        ("use_index_for_in_with_subqueries", VarUInt),
        ("use_uncompressed_cache", VarUInt),
    ]
};

/// The binary form of setting `name` at revision 54412 (ClickHouse 18.16), or None for a
/// setting it does not know.
pub fn binary_form(name: &str) -> Option<Binary> {
    SETTINGS
        .binary_search_by(|(known, _)| (*known).cmp(name))
        .ok()
        .map(|i| SETTINGS[i].1)
}

/// Every setting name known, sorted (for tests/docs).
pub fn names() -> impl Iterator<Item = &'static str> {
    SETTINGS.iter().map(|(name, _)| *name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Binary::{String, VarInt, VarUInt};

    #[test]
    fn the_table_is_sorted_and_unique() {
        for pair in SETTINGS.windows(2) {
            assert!(pair[0].0 < pair[1].0, "{} before {}", pair[0].0, pair[1].0);
        }
    }

    #[test]
    fn it_holds_what_system_settings_lists() {
        assert_eq!(names().count(), 184);
        assert!(names().all(|name| binary_form(name).is_some()));
    }

    #[test]
    fn known_settings_have_their_forms() {
        for (name, form) in [
            ("max_threads", VarUInt),
            ("readonly", VarUInt),
            ("max_execution_time", VarUInt),
            ("max_memory_usage", VarUInt),
            ("log_queries", VarUInt),
            ("insert_quorum", VarUInt),
            ("insert_quorum_timeout", VarUInt),
            ("tcp_keep_alive_timeout", VarUInt),
            ("load_balancing", String),
            ("totals_auto_threshold", String),
            ("format_csv_delimiter", String),
            ("send_logs_level", String),
            ("distributed_ddl_task_timeout", VarInt),
            ("http_zlib_compression_level", VarInt),
            ("network_zstd_compression_level", VarInt),
        ] {
            assert_eq!(binary_form(name), Some(form), "{name}");
        }
    }

    #[test]
    fn unknown_names_have_no_form() {
        for name in [
            "",
            "profile",
            "enable_conditional_computation",
            "max_thread",
            "zzz",
        ] {
            assert_eq!(binary_form(name), None, "{name:?}");
        }
        // First and last, so the search's edges are covered.
        assert_eq!(binary_form("add_http_cors_header"), Some(VarUInt));
        assert_eq!(binary_form("use_uncompressed_cache"), Some(VarUInt));
    }
}
