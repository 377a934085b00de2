//! The read models and the query API, on both backends.

mod common;

use common::readmodel::change;
use common::{isolated_config, spawn_app, spawn_dev, Backend, TestApp};
use serde_json::{json, Value};
use spiced::db::read::{Progress, ReadBatch, ReadSchema};
use std::collections::HashSet;
use std::time::{Duration, Instant};

backend_tests! {
    read_models_follow_the_log,
    filters_select_exactly_what_they_say,
    filters_on_indexed_properties_select_the_same,
    reads_wait_for_their_own_writes,
    a_rebuild_swaps_in_under_the_live_projection,
    pages_are_stable_under_concurrent_inserts,
    sorted_pages_are_stable_under_concurrent_inserts,
    sorts_order_by_type_with_missing_values_last,
    links_follow_references_both_ways_and_stop_at_cycles,
    search_finds_words_prefixes_and_phrases,
    relevance_ranks_at_most_max_ranked_matches,
}

/// `database.text_search_by_db`: one database searches in `english` (stemmed), the others in
/// the default `simple`, through the same API (PostgreSQL only: SQLite has no stemming).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_database_searches_in_its_configuration() {
    let (mut config, dir) = isolated_config(Backend::S3Postgres).await;
    config.database.text_search_by_db.insert("en".into(), "english".into());
    let app = &common::spawn_role_dev(config, dir).await;
    let class = json!({"id": "P", "properties": [{"name": "name", "type": "string"}]});
    for db in ["en", "plain"] {
        done(app, app.post("/databases", json!({"name": db})).await).await;
        done(app, app.post(&format!("/databases/{db}/classes"), class.clone()).await).await;
        let rows = json!({"instances": [{"id": "p1", "data": {"name": "running shoes"}}, {"id": "p2", "data": {"name": "the hat"}}]});
        done(app, app.post(&format!("/databases/{db}/classes/P/instances/bulk"), rows).await).await;
    }
    caught_up(app).await;
    let found = |db: &'static str, q: &'static str| async move {
        let (s, b) = app.get(&format!("/databases/{db}/classes/P/instances?q={}", urlencode(q))).await;
        assert_eq!(s, 200, "{db} {q}: {b}");
        b["items"].as_array().unwrap().iter().map(|i| i["instance_id"].as_str().unwrap().to_string()).collect::<Vec<_>>()
    };
    assert_eq!(found("en", "shoe run").await, ["p1"], "english stems shoes and running");
    assert!(found("plain", "shoe run").await.is_empty(), "simple matches words as written");
    assert_eq!(found("plain", "shoes").await, ["p1"]);
    assert!(found("en", "the").await.is_empty(), "english drops stop words");
    assert_eq!(found("plain", "the").await, ["p2"]);
}

/// PostgreSQL's `spiced_instant` (migration 0011) reads a datetime as the cursors do
/// (`filter::instant`, which SQLite calls itself): null for the same texts, the same instant
/// for the others. A text that one read and the other did not would make a sorted page skip
/// or repeat its row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_reads_datetimes_as_the_cursors_do() {
    let app = spawn_app(Backend::S3Postgres).await;
    let pg = common::readmodel::pg(&app.config).await;
    let texts = [
        "2026-01-31T09:30:00Z", "2026-01-31t09:30:00z", "2026-01-31 09:30:00+02:00", "2026-01-31T09:30:00.123456-14:59",
        "2026-01-31T09:30:00.5Z", "1970-01-01T00:00:00Z", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z",
        // Not instants, on both sides:
        "0000-01-01T00:00:00Z", "2026-02-30T00:00:00Z", "2026-13-01T00:00:00Z", "2026-01-31T24:00:00Z",
        "2026-12-31T23:59:60Z", "2026-01-31T09:30:00+15:00", "2026-01-31T09:30:00", "2026-01-31", "now", "today",
        "epoch", "2026-01-31T09:30Z", "2026-01-31T09:30:00+0200", " 2026-01-31T09:30:00Z", "2026-01-31T09:30:00Z ",
    ];
    for text in texts {
        let row = pg.query_one("SELECT (extract(epoch FROM spiced_instant($1::text)) * 1000000)::bigint", &[&text]).await.unwrap();
        let in_sql: Option<i64> = row.get(0);
        let in_rust = spiced::db::read::filter::instant(text).map(|t| t.timestamp_micros());
        assert_eq!(in_sql, in_rust, "{text:?}");
    }
    assert!(spiced::db::read::filter::instant("2026-01-31T09:30:00Z").is_some(), "the list is not all refusals");
}

const WAIT: Duration = Duration::from_secs(60);

async fn caught_up(app: &TestApp) {
    common::readmodel::caught_up(app, WAIT).await
}

async fn done(app: &TestApp, (s, b): (u16, Value)) {
    assert_eq!(s, 202, "{b}");
    let status = app.wait_command(b["command_id"].as_str().unwrap(), WAIT).await;
    assert!(status["status"] == "COMPLETED", "{status}");
}

async fn read_models_follow_the_log(backend: Backend) {
    let app = spawn_dev(backend).await;
    done(&app, app.post("/databases", json!({"name": "shop", "description": "d"})).await).await;
    done(&app, app.post("/databases/shop/classes", json!({"id": "Item", "label": "Items", "properties": [{"name": "n", "type": "integer"}]})).await).await;
    let instances: Vec<Value> = (0..30).map(|i| json!({"id": format!("i{i:02}"), "data": {"n": i}})).collect();
    done(&app, app.post("/databases/shop/classes/Item/instances/bulk", json!({"instances": instances})).await).await;
    done(&app, app.put("/databases/shop/classes/Item/instances/i03?expected_seq=1", json!({"data": {"n": 300}})).await).await;
    done(&app, app.delete("/databases/shop/classes/Item/instances/i04?expected_seq=1").await).await;
    caught_up(&app).await;

    // Every live instance exactly once through pages of 7; the deleted one is gone.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let url = match &cursor {
            Some(c) => format!("/databases/shop/classes/Item/instances?limit=7&cursor={c}"),
            None => "/databases/shop/classes/Item/instances?limit=7".to_string(),
        };
        let (s, page) = app.get(&url).await;
        assert_eq!(s, 200, "{page}");
        seen.extend(page["items"].as_array().unwrap().iter().map(|i| i["instance_id"].as_str().unwrap().to_string()));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!((seen.len(), unique.len()), (29, 29), "{seen:?}");
    assert!(!seen.contains(&"i04".to_string()));

    let (s, item) = app.get("/databases/shop/classes/Item/instances/i03").await;
    assert_eq!(s, 200);
    assert_eq!((item["data"]["n"].as_i64(), item["version"].as_u64()), (Some(300), Some(2)), "{item}");
    let (s, _) = app.get("/databases/shop/classes/Item/instances/i04").await;
    assert_eq!(s, 404);
    let (_, class) = app.get("/databases/shop/classes/Item").await;
    assert_eq!((class["label"].as_str(), class["version"].as_u64()), (Some("Items"), Some(1)));
    let (_, classes) = app.get("/databases/shop/classes").await;
    assert_eq!(classes["items"].as_array().unwrap().len(), 1);
    let (_, db) = app.get("/databases/shop").await;
    assert_eq!(db["description"], "d");
    let (s, e) = app.get("/databases/shop/classes/Item/instances?limit=5000").await;
    assert_eq!((s, e["error"].as_str()), (400, Some("invalid_query")));
}

/// Every id of a class's instances through pages of `limit`, following cursors; also checks
/// the ids come in strictly increasing order.
async fn all_pages(app: &TestApp, class_path: &str, query: &str, limit: usize) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    for item in pages(app, &format!("{class_path}/instances?limit={limit}{query}")).await {
        let id = item["instance_id"].as_str().unwrap().to_string();
        assert!(seen.last().is_none_or(|last| *last < id), "{id} out of order after {:?}", seen.last());
        seen.push(id);
    }
    seen
}

/// Every item of a list, following `next_cursor` from `first` (a URL with a query) to the end.
async fn pages(app: &TestApp, first: &str) -> Vec<Value> {
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = first.to_string();
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={}", urlencode(c)));
        }
        let (s, page) = app.get(&url).await;
        assert_eq!(s, 200, "{url}: {page}");
        items.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return items,
        }
    }
}

/// Every `where=` operator, OR groups and quoted values against a model of the data, through
/// keyset pages of 3; `count=true` gives the same number, exact up to `serve.max_count`.
async fn filters_select_exactly_what_they_say(backend: Backend) {
    filters_against_a_model(backend, false).await
}

/// The same, with the scalar properties declared `indexed` (inherited by the class listed):
/// on PostgreSQL the projection builds a btree index for each and the filters are spelled
/// for it; the rows are the same.
async fn filters_on_indexed_properties_select_the_same(backend: Backend) {
    filters_against_a_model(backend, true).await
}

async fn filters_against_a_model(backend: Backend, indexed: bool) {
    let (mut config, dir) = isolated_config(backend).await;
    config.serve.max_count = 10;
    let app = common::spawn_role_dev(config.clone(), dir).await;
    done(&app, app.post("/databases", json!({"name": "f"})).await).await;
    let mut props = json!([
        {"name": "n", "type": "integer"}, {"name": "x", "type": "number"}, {"name": "s", "type": "string"},
        {"name": "b", "type": "boolean"}, {"name": "j", "type": "json"}, {"name": "at", "type": "datetime"}
    ]);
    for p in props.as_array_mut().unwrap().iter_mut().filter(|p| indexed && p["type"] != "json") {
        p["indexed"] = json!(true);
    }
    done(&app, app.post("/databases/f/classes", json!({"id": "Base", "properties": props})).await).await;
    let child = json!({"id": "T", "parent_class": "Base", "properties": [{"name": "extra", "type": "string"}]});
    done(&app, app.post("/databases/f/classes", child).await).await;
    if backend == Backend::S3Postgres {
        let sql = "SELECT indexname FROM pg_indexes WHERE schemaname = 'spiced_read' AND indexname LIKE 'read_models_ix_%' ORDER BY 1";
        let names: Vec<String> = common::readmodel::pg(&config).await.query(sql, &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
        let want = if indexed { vec!["read_models_ix_b_b", "read_models_ix_i_at", "read_models_ix_n_n", "read_models_ix_n_x", "read_models_ix_t_s"] } else { vec![] };
        assert_eq!(names, want, "an index per indexed property, none otherwise");
    }
    // 24 instances; every third lacks n, every fourth lacks s.
    let data = |i: i64| {
        let mut d = json!({"x": i as f64 / 2.0, "b": i % 2 == 0, "at": format!("2026-01-{:02}T00:00:00Z", i + 1)});
        if i % 3 != 0 {
            d["n"] = json!(i);
        }
        if i % 4 != 0 {
            d["s"] = json!(["apple", "Banana", "cherry"][i as usize % 3]);
        }
        if i % 5 == 0 {
            d["j"] = json!({"k": i});
        }
        if i == 7 {
            d["extra"] = json!("yes");
        }
        // Datetimes compare as instants: an offset (23:30 UTC on the 3rd) and a fraction that
        // byte order would put before the whole second.
        if i == 3 {
            d["at"] = json!("2026-01-04T01:30:00+02:00");
        }
        if i == 6 {
            d["at"] = json!("2026-01-07T00:00:00.5Z");
        }
        if i == 11 {
            // The characters the grammar gives a meaning to, matched through quoting.
            d["s"] = json!(r#"x,y|z (w) "q" \"#);
        }
        d
    };
    let instances: Vec<Value> = (0..24).map(|i| json!({"id": format!("i{i:02}"), "data": data(i)})).collect();
    done(&app, app.post("/databases/f/classes/T/instances/bulk", json!({"instances": instances})).await).await;
    caught_up(&app).await;

    type Pick = fn(&Value) -> bool;
    let cases: Vec<(&str, Pick)> = vec![
        ("n=4", |d| d["n"] == 4),
        ("n!=4", |d| d["n"].is_i64() && d["n"] != 4),
        ("n>20", |d| d["n"].as_i64().is_some_and(|n| n > 20)),
        ("n>=20", |d| d["n"].as_i64().is_some_and(|n| n >= 20)),
        ("n<3", |d| d["n"].as_i64().is_some_and(|n| n < 3)),
        ("n<=2", |d| d["n"].as_i64().is_some_and(|n| n <= 2)),
        ("x>=10.5", |d| d["x"].as_f64().is_some_and(|x| x >= 10.5)),
        ("n=in:(1|5|22|99)", |d| [1, 5, 22].iter().any(|v| d["n"] == *v)),
        ("s=Banana", |d| d["s"] == "Banana"),
        ("s>apple", |d| d["s"].as_str().is_some_and(|s| s > "apple")),
        ("s=in:(apple|cherry)", |d| d["s"] == "apple" || d["s"] == "cherry"),
        ("b=true", |d| d["b"] == true),
        ("b!=true", |d| d["b"] == false),
        ("j=exists:true", |d| d.get("j").is_some()),
        ("n=exists:false", |d| d.get("n").is_none()),
        ("at<2026-01-05T00:00:00Z", |d| at(d) < at_of("2026-01-05T00:00:00Z")),
        ("at<=2026-01-07T00:00:00Z", |d| at(d) <= at_of("2026-01-07T00:00:00Z")),
        ("at>2026-01-07T00:00:00+00:00", |d| at(d) > at_of("2026-01-07T00:00:00Z")),
        ("at=2026-01-03T23:30:00Z", |d| at(d) == at_of("2026-01-03T23:30:00Z")),
        ("at=in:(2026-01-03T23:30:00Z|2026-01-01T01:00:00+01:00)", |d| [at_of("2026-01-03T23:30:00Z"), at_of("2026-01-01T00:00:00Z")].contains(&at(d))),
        ("at=not_in:(2026-01-07T00:00:00.500Z)", |d| at(d) != at_of("2026-01-07T00:00:00.5Z")),
        ("at=like:2026-01-04T*", |d| d["at"].as_str().is_some_and(|a| a.starts_with("2026-01-04T"))),
        ("extra=yes", |d| d["extra"] == "yes"),
        ("n>=4,n<=13,s=exists:true,b=false", |d| {
            d["n"].as_i64().is_some_and(|n| (4..=13).contains(&n)) && d.get("s").is_some() && d["b"] == false
        }),
        ("n=not_in:(1|2|3)", |d| d["n"].as_i64().is_some_and(|n| !(1..=3).contains(&n))),
        ("s=not_in:(apple)", |d| d["s"].as_str().is_some_and(|s| s != "apple")),
        ("s=is_null:true", |d| d.get("s").is_none()),
        ("s=is_null:false", |d| d.get("s").is_some()),
        ("s=like:*an*", |d| d["s"].as_str().is_some_and(|s| s.contains("an"))),
        ("s=like:b*", |d| d["s"].as_str().is_some_and(|s| s.starts_with('b'))),
        ("s=ilike:b*", |d| d["s"].as_str().is_some_and(|s| s.to_lowercase().starts_with('b'))),
        ("s=ilike:*RR*", |d| d["s"].as_str().is_some_and(|s| s.contains("rr"))),
        ("s=like:a_ple", |d| d["s"] == "a_ple"),
        ("(n=4|s=cherry)", |d| d["n"] == 4 || d["s"] == "cherry"),
        // Equalities on indexed properties: on PostgreSQL one index scan per alternative,
        // merged; a row matching both (i02, i14) is listed once.
        ("(s=cherry|b=true),n>3", |d| (d["s"] == "cherry" || d["b"] == true) && d["n"].as_i64().is_some_and(|n| n > 3)),
        ("(s=cherry|b=true|n=9)", |d| d["s"] == "cherry" || d["b"] == true || d["n"] == 9),
        ("(n<2|n>22),b=true", |d| d["n"].as_i64().is_some_and(|n| !(2..=22).contains(&n)) && d["b"] == true),
        (r#"s=in:("apple"|"x,y|z")"#, |d| d["s"] == "apple"),
        (r#"s="x,y|z (w) \"q\" \\""#, |d| d["s"] == r#"x,y|z (w) "q" \"#),
        (r#"s=in:("x,y|z (w) \"q\" \\"|cherry),n>3"#, |d| (d["s"] == "cherry" || d["s"] == r#"x,y|z (w) "q" \"#) && d["n"].as_i64().is_some_and(|n| n > 3)),
        (r#"(s="x,y|z (w) \"q\" \\"|n=4)"#, |d| d["s"] == r#"x,y|z (w) "q" \"# || d["n"] == 4),
        (r#"s=like:"x,y|z*""#, |d| d["s"].as_str().is_some_and(|s| s.starts_with("x,y|z"))),
        (r#"(s="Banana"|extra="yes")"#, |d| d["s"] == "Banana" || d["extra"] == "yes"),
    ];
    for (filter, pick) in cases {
        let want: Vec<String> = (0..24).filter(|i| pick(&data(*i))).map(|i| format!("i{i:02}")).collect();
        let query = format!("&where={}", urlencode(filter));
        // Pages of 3, so the filter and the cursor work together.
        let got = all_pages(&app, "/databases/f/classes/T", &query, 3).await;
        assert_eq!(got, want, "where={filter}");
        let (s, page) = app.get(&format!("/databases/f/classes/T/instances?limit=1&count=true{query}")).await;
        assert_eq!(s, 200, "{page}");
        let counted = (page["total"].as_u64(), page["total_is_lower_bound"].as_bool());
        assert_eq!(counted, (Some(want.len().min(10) as u64), Some(want.len() > 10)), "count of where={filter}: {page}");
    }
    let (_, page) = app.get("/databases/f/classes/T/instances").await;
    assert!(page.get("total").is_none(), "no count unless asked: {page}");

    for (bad, says) in [
        ("nope=1", "not a property"),
        ("n>=many", "not a number"),
        ("b>true", "booleans take"),
        ("j=1", "only be tested with exists"),
        ("n", "expected an operator"),
        ("(n=1,s=a)", "at character 5 (','): expected `|` or `)`"),
        ("s=\"open", "the quoted value is not closed"),
        ("n=like:1*", "like and ilike take string properties"),
        ("at>yesterday", "not an RFC 3339 datetime"),
        ("at<2026-01-01T24:00:00Z", "not an RFC 3339 datetime"),
    ] {
        let (s, e) = app.get(&format!("/databases/f/classes/T/instances?where={}", urlencode(bad))).await;
        assert_eq!((s, e["error"].as_str()), (400, Some("invalid_filter")), "{bad}: {e}");
        assert!(e["message"].as_str().unwrap().contains(says), "{bad}: {e}");
    }
    let (s, e) = app.get("/databases/f/classes?where=n%3D1").await;
    assert_eq!((s, e["error"].as_str()), (400, Some("invalid_filter")), "{e}");
    let (s, _) = app.get("/databases/f/classes/Nope/instances?where=n%3D1").await;
    assert_eq!(s, 404);
}

/// `q=`: every word must occur in some string value (any case), `prefix*` and `"a phrase"`;
/// it combines with `where=` and `count=true`, and follows updates and deletes; a bad query is
/// a 400 `invalid_search`.
async fn search_finds_words_prefixes_and_phrases(backend: Backend) {
    let app = &spawn_dev(backend).await;
    done(app, app.post("/databases", json!({"name": "s"})).await).await;
    let class = json!({"id": "P", "properties": [{"name": "name", "type": "string"}, {"name": "desc", "type": "string"}, {"name": "n", "type": "integer"}, {"name": "tags", "type": "json"}]});
    done(app, app.post("/databases/s/classes", class).await).await;
    let products = json!({"instances": [
        {"id": "p1", "data": {"name": "Red Running Shoe", "desc": "light", "n": 1}},
        {"id": "p2", "data": {"name": "Blue shoe", "desc": "running fast", "n": 2}},
        {"id": "p3", "data": {"name": "Red hat", "n": 3}},
        {"id": "p4", "data": {"name": "Producer"}},
        {"id": "p5", "data": {"n": 5}},
        {"id": "p6", "data": {"tags": {"colour": ["scarlet", 7]}}}]});
    done(app, app.post("/databases/s/classes/P/instances/bulk", products).await).await;
    caught_up(app).await;
    let found = |query: &'static str| async move {
        let (s, b) = app.get(&format!("/databases/s/classes/P/instances?q={}&count=true", urlencode(query))).await;
        assert_eq!(s, 200, "{query}: {b}");
        let mut ids: Vec<String> = b["items"].as_array().unwrap().iter().map(|i| i["instance_id"].as_str().unwrap().to_string()).collect();
        assert_eq!(b["total"], json!(ids.len()), "{query}: {b}");
        ids.sort(); // which rows match; the order is relevance's, checked below
        ids
    };
    assert_eq!(found("red").await, ["p1", "p3"]);
    assert_eq!(found("RED shoe").await, ["p1"]);
    assert_eq!(found("running").await, ["p1", "p2"]);
    assert_eq!(found("\"running shoe\"").await, ["p1"]);
    assert_eq!(found("prod*").await, ["p4"]);
    assert_eq!(found("sho*").await, ["p1", "p2"]);
    assert!(found("green").await.is_empty());
    assert_eq!(found("scarlet").await, ["p6"], "strings nested in the data are searched too");
    assert!(found("7").await.is_empty(), "numbers are not");
    let (_, b) = app.get(&format!("/databases/s/classes/P/instances?q=red&where={}", urlencode("n>1"))).await;
    assert_eq!(b["items"].as_array().unwrap().len(), 1, "q= and where= together: {b}");
    done(app, app.delete("/databases/s/classes/P/instances/p3?expected_seq=1").await).await;
    done(app, app.put("/databases/s/classes/P/instances/p1?expected_seq=1", json!({"data": {"name": "Green Running Shoe"}})).await).await;
    caught_up(app).await;
    assert!(found("red").await.is_empty(), "the search follows updates and deletes");
    assert_eq!(found("green").await, ["p1"]);
    // Relevance order: the better match first, page after page (the cursor carries the rank).
    let wool = json!({"instances": [{"id": "w1", "data": {"name": "wool hat"}}, {"id": "w2", "data": {"name": "wool wool", "desc": "wool"}},
        {"id": "w3", "data": {"name": "wool wool scarf"}}]});
    done(app, app.post("/databases/s/classes/P/instances/bulk", wool).await).await;
    caught_up(app).await;
    let (_, b) = app.get("/databases/s/classes/P/instances?q=wool").await;
    let order: Vec<&str> = b["items"].as_array().unwrap().iter().map(|i| i["instance_id"].as_str().unwrap()).collect();
    assert_eq!(order, ["w2", "w3", "w1"], "{b}");
    let paged = pages(app, "/databases/s/classes/P/instances?q=wool&limit=1").await;
    let paged: Vec<&str> = paged.iter().map(|i| i["instance_id"].as_str().unwrap()).collect();
    assert_eq!(paged, order, "pages follow the relevance order");
    let (_, b) = app.get("/databases/s/classes/P/instances?q=wool&sort=id").await;
    assert_eq!(b["items"][0]["instance_id"], "w1", "sort= wins over relevance: {b}");
    for (path, code) in [("/databases/s/classes/P/instances?q=%22open", "invalid_search"), ("/databases/s/classes/P/instances?q=*", "invalid_search"), ("/databases?q=red", "invalid_search")] {
        let (s, b) = app.get(path).await;
        assert_eq!((s, b["error"].as_str()), (400, Some(code)), "{path}: {b}");
    }
}

/// With more matches than `serve.max_ranked`, relevance pages are the best of the first
/// `max_ranked` found, in rank order, each row once, and say `rank_is_partial`; with fewer,
/// every match, and they say it is not; `sort=id` walks every match and says nothing of ranks.
async fn relevance_ranks_at_most_max_ranked_matches(backend: Backend) {
    let (mut config, dir) = isolated_config(backend).await;
    config.serve.max_ranked = 3;
    let app = &common::spawn_role_dev(config, dir).await;
    done(app, app.post("/databases", json!({"name": "r"})).await).await;
    let class = json!({"id": "P", "properties": [{"name": "name", "type": "string"}]});
    done(app, app.post("/databases/r/classes", class).await).await;
    // w<n> says "wool" n times, so its rank grows with n on both backends; the three "silk"
    // rows are as many as may be ranked.
    let mut rows: Vec<Value> = (1..=6).map(|n| json!({"id": format!("w{n}"), "data": {"name": vec!["wool"; n].join(" ")}})).collect();
    rows.extend((1..=3).map(|n| json!({"id": format!("s{n}"), "data": {"name": vec!["silk"; n].join(" ")}})));
    done(app, app.post("/databases/r/classes/P/instances/bulk", json!({"instances": rows})).await).await;
    caught_up(app).await;
    let ids = |items: &[Value]| items.iter().map(|i| i["instance_id"].as_str().unwrap().to_string()).collect::<Vec<_>>();
    let (_, first) = app.get("/databases/r/classes/P/instances?q=wool&limit=2").await;
    assert_eq!(first["rank_is_partial"], json!(true), "{first}");
    let paged = ids(&pages(app, "/databases/r/classes/P/instances?q=wool&limit=2").await);
    assert_eq!(paged.len(), 3, "the first three matches are ranked: {paged:?}");
    let times = |id: &String| id[1..].parse::<u32>().unwrap();
    assert!(paged.windows(2).all(|w| times(&w[0]) > times(&w[1])), "in rank order, each once: {paged:?}");
    let (_, b) = app.get("/databases/r/classes/P/instances?q=silk").await;
    assert_eq!((ids(b["items"].as_array().unwrap()), &b["rank_is_partial"]), (vec!["s3".into(), "s2".into(), "s1".into()], &json!(false)), "{b}");
    let (_, b) = app.get("/databases/r/classes/P/instances?q=wool&sort=id").await;
    assert_eq!(ids(b["items"].as_array().unwrap()), ["w1", "w2", "w3", "w4", "w5", "w6"], "{b}");
    assert!(b.get("rank_is_partial").is_none(), "{b}");
    let (_, b) = app.get("/databases/r/classes/P/instances?q=nothing").await;
    assert_eq!((b["items"].as_array().unwrap().len(), &b["rank_is_partial"]), (0, &json!(false)), "{b}");
}

/// The instant of an instance's `at` (every one has it).
fn at(d: &Value) -> chrono::DateTime<chrono::FixedOffset> {
    at_of(d["at"].as_str().unwrap())
}

fn at_of(s: &str) -> chrono::DateTime<chrono::FixedOffset> {
    chrono::DateTime::parse_from_rfc3339(s).unwrap()
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

async fn reads_wait_for_their_own_writes(backend: Backend) {
    let (mut config, dir) = isolated_config(backend).await;
    config.serve.min_version_wait_ms = 3000;
    let app = common::spawn_role_dev(config, dir).await;
    done(&app, app.post("/databases", json!({"name": "r"})).await).await;
    let class = json!({"id": "C", "properties": [{"name": "n", "type": "integer"}]});
    done(&app, app.post("/databases/r/classes", class).await).await;
    let (s, b) = app.post("/databases/r/classes/C/instances", json!({"id": "a", "data": {"n": 1}})).await;
    assert_eq!(s, 202, "{b}");
    for n in 2..=5 {
        // Straight after the 202: the read waits for the projection, never returns older data.
        let (s, b) = app.put(&format!("/databases/r/classes/C/instances/a?expected_seq={}", n - 1), json!({"data": {"n": n}})).await;
        assert_eq!(s, 202, "{b}");
        let seq = b["sequence_number"].as_u64().expect("202 carries the sequence");
        let (s, item) = app.get(&format!("/databases/r/classes/C/instances/a?min_version={seq}")).await;
        assert_eq!(s, 200, "{item}");
        assert_eq!((item["version"].as_u64(), item["data"]["n"].as_i64()), (Some(seq), Some(n)), "{item}");
    }
    let started = Instant::now();
    let r = app.http.get(app.url("/databases/r/classes/C/instances/a?min_version=99")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 425);
    assert_eq!(r.headers()["retry-after"], "1");
    let body: Value = r.json().await.unwrap();
    assert_eq!((body["error"].as_str(), body["version"].as_u64()), (Some("not_yet_projected"), Some(5)), "{body}");
    assert!(started.elapsed() >= Duration::from_millis(3000), "waited the configured bound");
}

/// The query API over 10,000 rows while rows keep arriving. The rows are written through the
/// projection's own write path (the pipeline in front of it has its own tests), which keeps
/// this test about paging.
async fn pages_are_stable_under_concurrent_inserts(backend: Backend) {
    let app = spawn_app(backend).await;
    let (db, _) = app.storage().await;
    let rows = |ids: Vec<u32>| {
        let changes = ids.into_iter().map(|i| change(&format!("p:main:C:k{i:05}"), 1, 1, i as i64, false)).collect();
        ReadBatch { changes, progress: Progress::Kafka(vec![]) }
    };
    for chunk in 0..10 {
        db.read.apply(&ReadSchema::live(), &rows((0..1000).map(|i| (chunk * 1000 + i) * 2).collect())).await.unwrap();
    }
    // Odd ids arrive while the pages are read, spread over the whole key range.
    let writer = {
        let db = db.clone();
        tokio::spawn(async move {
            for round in 0..50 {
                let ids: Vec<u32> = (0..100).map(|i| (i * 50 + round) * 2 + 1).collect();
                db.read.apply(&ReadSchema::live(), &rows(ids)).await.unwrap();
            }
        })
    };
    let seen = all_pages(&app, "/databases/p/classes/C", "", 100).await;
    writer.await.unwrap();
    let even = seen.iter().filter(|id| id[1..].parse::<u32>().unwrap() % 2 == 0).count();
    assert_eq!(even, 10_000, "each pre-existing instance exactly once (ids increase strictly)");
    assert!(seen.len() > 10_000, "inserts ran during the paging");
}

/// A class row for the read models, declaring `properties`.
fn class_row(key: &str, properties: Value) -> spiced::db::read::Change {
    let mut c = change(key, 1, 1, 0, false);
    c.row.kind = spiced::db::read::ReadKind::Class;
    c.row.state = Some(json!({"class_id": key.rsplit(':').next().unwrap(), "properties": properties}));
    c
}

/// Every page of a sorted list: the items, in order.
async fn sorted_pages(app: &TestApp, class_path: &str, sort: &str, limit: usize) -> Vec<Value> {
    pages(app, &format!("{class_path}/instances?limit={limit}&sort={}", urlencode(sort))).await
}

/// Sorted by `-n` (descending, ties by id) in pages of 100 while rows are inserted all over
/// the order: every row that was there before is seen exactly once, and the order never
/// goes back.
async fn sorted_pages_are_stable_under_concurrent_inserts(backend: Backend) {
    let app = spawn_app(backend).await;
    let (db, _) = app.storage().await;
    let class = class_row("q:main:C", json!([{"name": "n", "type": "integer"}]));
    db.read.apply(&ReadSchema::live(), &ReadBatch { changes: vec![class], progress: Progress::Kafka(vec![]) }).await.unwrap();
    // n repeats every 1,000 rows, so ties are broken by id across pages.
    let rows = |ids: Vec<u32>| {
        let changes = ids.into_iter().map(|i| change(&format!("q:main:C:k{i:05}"), 1, 1, (i % 1000) as i64, false)).collect();
        ReadBatch { changes, progress: Progress::Kafka(vec![]) }
    };
    db.read.apply(&ReadSchema::live(), &rows((0..3000).map(|i| i * 2).collect())).await.unwrap();
    let writer = {
        let db = db.clone();
        tokio::spawn(async move {
            for round in 0..30 {
                let ids: Vec<u32> = (0..50).map(|i| (i * 30 + round) * 2 + 1).collect();
                db.read.apply(&ReadSchema::live(), &rows(ids)).await.unwrap();
            }
        })
    };
    let seen = sorted_pages(&app, "/databases/q/classes/C", "-n", 100).await;
    writer.await.unwrap();
    let order: Vec<(i64, String)> = seen.iter().map(|i| (i["data"]["n"].as_i64().unwrap(), i["instance_id"].as_str().unwrap().to_string())).collect();
    assert!(order.windows(2).all(|w| w[0].0 > w[1].0 || (w[0].0 == w[1].0 && w[0].1 < w[1].1)), "strictly in -n, id order");
    let even = order.iter().filter(|(_, id)| id[1..].parse::<u32>().unwrap() % 2 == 0).count();
    assert_eq!(even, 3000, "each pre-existing instance exactly once");
}

/// Through the API: numbers as numbers, strings in byte order, dates as dates, datetimes as instants, booleans false first, several
/// keys, and a value that is missing or of another type last ascending, first descending.
async fn sorts_order_by_type_with_missing_values_last(backend: Backend) {
    let app = spawn_dev(backend).await;
    done(&app, app.post("/databases", json!({"name": "o"})).await).await;
    let props = json!([{"name": "n", "type": "number"}, {"name": "s", "type": "string"}, {"name": "b", "type": "boolean"}, {"name": "j", "type": "json"}, {"name": "d", "type": "date"}, {"name": "t", "type": "datetime"}]);
    done(&app, app.post("/databases/o/classes", json!({"id": "C", "properties": props})).await).await;
    let data = [
        ("a", json!({"n": 10, "s": "b", "b": true, "d": "2026-03-01", "t": "2026-01-01T10:00:00Z"})),
        ("b", json!({"n": 9.5, "s": "B", "b": false, "d": "2026-10-02", "t": "2026-01-01T11:30:00+02:00"})),
        ("c", json!({"s": "a", "d": "2025-12-31", "t": "2026-01-01T10:00:00.5Z"})),
        ("d", json!({"n": 100, "s": "b", "b": true})),
        ("e", json!({"n": 10, "b": false, "d": "2026-03-01", "t": "2026-01-01T10:00:00.25+00:00"})),
    ];
    let instances: Vec<Value> = data.iter().map(|(id, d)| json!({"id": id, "data": d})).collect();
    done(&app, app.post("/databases/o/classes/C/instances/bulk", json!({"instances": instances})).await).await;
    caught_up(&app).await;
    let ids = |items: Vec<Value>| items.iter().map(|i| i["instance_id"].as_str().unwrap().to_string()).collect::<Vec<_>>().join("");
    for (sort, want) in [
        ("n", "baedc"),
        ("-n", "cdaeb"),
        ("n,-id", "beadc"),
        ("s", "bcade"),
        ("-s,n", "eadcb"),
        ("b,n", "beadc"),
        ("d", "caebd"),
        ("-d", "dbaec"),
        ("-d,-id", "dbeac"),
        // As instants (byte order would be "ecabd").
        ("t", "baecd"),
        ("-t", "dceab"),
        ("-id", "edcba"),
        ("id", "abcde"),
    ] {
        for limit in [1, 2, 100] {
            let got = ids(sorted_pages(&app, "/databases/o/classes/C", sort, limit).await);
            assert_eq!(got, want, "sort={sort} in pages of {limit}");
        }
    }
    for (bad, code) in [("j", "invalid_sort"), ("nope", "invalid_sort"), ("id,n", "invalid_sort")] {
        let (s, e) = app.get(&format!("/databases/o/classes/C/instances?sort={}", urlencode(bad))).await;
        assert_eq!((s, e["error"].as_str()), (400, Some(code)), "{bad}: {e}");
    }
    let (s, first) = app.get("/databases/o/classes/C/instances?limit=1&sort=n").await;
    assert_eq!(s, 200, "{first}");
    let cursor = urlencode(first["next_cursor"].as_str().unwrap());
    let (s, e) = app.get(&format!("/databases/o/classes/C/instances?limit=1&sort=-n&cursor={cursor}")).await;
    assert_eq!((s, e["error"].as_str()), (400, Some("invalid_sort")), "a cursor of another sort: {e}");
    let (s, e) = app.get("/databases/o/classes?sort=n").await;
    assert_eq!((s, e["error"].as_str()), (400, Some("invalid_sort")), "{e}");
}

/// `.../links`: outgoing references by property, incoming ones paged by key, `depth` 2 and 3
/// breadth first with a cycle reported once and not followed, a dangling reference with a
/// null instance (made by a class update that turns a string property into a reference: the
/// update does not check that the strings name instances).
async fn links_follow_references_both_ways_and_stop_at_cycles(backend: Backend) {
    let app = spawn_dev(backend).await;
    done(&app, app.post("/databases", json!({"name": "g"})).await).await;
    done(&app, app.post("/databases/g/classes", json!({"id": "Company", "properties": [{"name": "name", "type": "string"}]})).await).await;
    let person = json!({"id": "Person", "properties": [{"name": "manager", "type": "ref:Person"}, {"name": "company", "type": "ref:Company"},
        {"name": "clients", "type": "ref:Company", "cardinality": "many"}, {"name": "mentor", "type": "string"}]});
    done(&app, app.post("/databases/g/classes", person.clone()).await).await;
    done(&app, app.post("/databases/g/classes/Company/instances", json!({"id": "acme", "data": {"name": "Acme"}})).await).await;
    done(&app, app.post("/databases/g/classes/Company/instances", json!({"id": "zeta", "data": {"name": "Zeta"}})).await).await;
    // A reference must name an instance that exists as of its command, so a bulk member may
    // name an earlier member, and the cycle is closed by an update.
    let people = json!({"instances": [
        {"id": "carol", "data": {}},
        {"id": "bob", "data": {"manager": "carol", "company": "acme"}},
        {"id": "alice", "data": {"manager": "bob", "company": "acme"}},
        {"id": "dave", "data": {"mentor": "ghost", "clients": ["zeta", "acme"]}}]});
    done(&app, app.post("/databases/g/classes/Person/instances/bulk", people).await).await;
    done(&app, app.put("/databases/g/classes/Person/instances/carol?expected_seq=1", json!({"data": {"manager": "alice"}})).await).await;
    let mut mentor_ref = person["properties"].clone();
    mentor_ref[3]["type"] = json!("ref:Person");
    done(&app, app.put("/databases/g/classes/Person?expected_seq=1", json!({"patch": {"properties": mentor_ref}})).await).await;
    caught_up(&app).await;
    let app = &app;
    let links = |path: &str| {
        let url = format!("/databases/g/classes/{path}");
        async move {
            let (s, b) = app.get(&url).await;
            assert_eq!(s, 200, "{url}: {b}");
            b
        }
    };
    // (depth, property, source, target, cycle, far end present)
    let shown = |b: &Value| -> Vec<String> {
        b["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                let end = |e: &Value| e["instance_id"].as_str().unwrap().to_string();
                let mark = if l["cycle"] == true { " cycle" } else if l["instance"].is_null() { " missing" } else { "" };
                format!("{} {} {}->{}{mark}", l["depth"], l["property"].as_str().unwrap(), end(&l["source"]), end(&l["target"]))
            })
            .collect()
    };
    let b = links("Person/instances/alice/links").await;
    assert_eq!(shown(&b), ["1 company alice->acme", "1 manager alice->bob"]);
    assert_eq!(b["items"][1]["instance"]["data"]["manager"], "carol", "the far end's state: {b}");
    assert_eq!(
        shown(&links("Person/instances/dave/links").await),
        ["1 clients dave->zeta", "1 clients dave->acme", "1 mentor dave->ghost missing"],
        "each id of a many-valued reference, in order"
    );
    assert_eq!(shown(&links("Company/instances/zeta/links?direction=in").await), ["1 clients dave->zeta"]);
    assert_eq!(
        shown(&links("Person/instances/alice/links?depth=3").await),
        [
            "1 company alice->acme", "1 manager alice->bob",
            "2 company bob->acme cycle", "2 manager bob->carol",
            "3 manager carol->alice cycle",
        ]
    );
    let first = links("Company/instances/acme/links?direction=in&limit=1").await;
    assert_eq!(shown(&first), ["1 company alice->acme"]);
    let cursor = first["next_cursor"].as_str().unwrap();
    let second = links(&format!("Company/instances/acme/links?direction=in&limit=1&cursor={cursor}")).await;
    assert_eq!(shown(&second), ["1 company bob->acme"]);
    let third = links(&format!("Company/instances/acme/links?direction=in&limit=1&cursor={}", second["next_cursor"].as_str().unwrap())).await;
    assert_eq!(shown(&third), ["1 clients dave->acme"]);
    let fourth = links(&format!("Company/instances/acme/links?direction=in&limit=1&cursor={}", third["next_cursor"].as_str().unwrap())).await;
    assert_eq!((shown(&fourth).len(), &fourth["next_cursor"]), (0, &Value::Null));
    let (s, e) = app.post("/databases/g/classes", json!({"id": "Bad", "properties": [{"name": "n", "type": "integer", "cardinality": "many"}]})).await;
    assert_eq!((s, e["error"].as_str()), (400, Some("invalid_property")), "cardinality is for refs: {e}");
    let id = accepted_id(app.post("/databases/g/classes/Person/instances", json!({"data": {"clients": "acme"}})).await);
    let status = app.wait_command(&id, WAIT).await;
    assert_eq!(status["error"]["code"], "invalid_instance", "a many-valued ref takes an array: {status}");
    assert_eq!(
        shown(&links("Person/instances/alice/links?direction=in&depth=2").await),
        ["1 manager carol->alice", "2 manager bob->carol"]
    );
    let b = links("Person/instances/alice/links?depth=3&limit=3").await;
    assert_eq!((shown(&b).len(), &b["truncated"]), (3, &json!(true)), "{b}");
    for (bad, status) in [("Person/instances/alice/links?depth=4", 400), ("Person/instances/nobody/links", 404), ("Person/instances/alice/links?direction=sideways", 400)] {
        let (s, b) = app.get(&format!("/databases/g/classes/{bad}")).await;
        assert_eq!(s, status, "{bad}: {b}");
    }
}

fn accepted_id((s, b): (u16, Value)) -> String {
    assert_eq!(s, 202, "{b}");
    b["command_id"].as_str().unwrap().to_string()
}

/// Every instance of a class through the API: (id, version, data).
async fn instances(app: &TestApp, class_path: &str) -> Vec<(String, u64, Value)> {
    let (s, page) = app.get(&format!("{class_path}/instances?limit=1000")).await;
    assert_eq!(s, 200, "{page}");
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["instance_id"].as_str().unwrap().to_string(), i["version"].as_u64().unwrap(), i["data"].clone()))
        .collect()
}

/// `spiced project --rebuild` while `spiced dev` projects the same storage (both backends;
/// the pipeline test covers PostgreSQL with Kafka): the swapped-in read models answer the
/// same, the old ones are kept under the target name, and the live projection carries on.
async fn a_rebuild_swaps_in_under_the_live_projection(backend: Backend) {
    let app = spawn_dev(backend).await;
    done(&app, app.post("/databases", json!({"name": "s"})).await).await;
    done(&app, app.post("/databases/s/classes", json!({"id": "C", "properties": [{"name": "n", "type": "integer", "indexed": true}]})).await).await;
    let instances_in: Vec<Value> = (0..20).map(|i| json!({"id": format!("i{i:02}"), "data": {"n": i}})).collect();
    done(&app, app.post("/databases/s/classes/C/instances/bulk", json!({"instances": instances_in})).await).await;
    done(&app, app.put("/databases/s/classes/C/instances/i03?expected_seq=1", json!({"data": {"n": 33}})).await).await;
    done(&app, app.delete("/databases/s/classes/C/instances/i04?expected_seq=1").await).await;
    caught_up(&app).await;
    let before = instances(&app, "/databases/s/classes/C").await;
    assert_eq!(before.len(), 19);

    let options = spiced::project::rebuild::Options {
        until: spiced::project::rebuild::Until::Head,
        target: Some("swapped_out".into()),
        no_swap: false,
    };
    let report = spiced::project::rebuild::run(&app.config, options).await.unwrap();
    assert!(report.swapped && report.events >= 23, "{report:?}");
    assert_eq!(instances(&app, "/databases/s/classes/C").await, before, "the rebuilt read models answer the same");
    let (db, _) = app.storage().await;
    assert!(db.read.schema_exists(&ReadSchema::named("swapped_out").unwrap()).await.unwrap());
    if backend == Backend::S3Postgres {
        // Built after the target was filled, before the swap: the live schema has them again.
        let sql = "SELECT indexname FROM pg_indexes WHERE schemaname = 'spiced_read' \
                   AND indexname IN ('read_models_text_simple', 'read_models_ix_n_n') ORDER BY 1";
        let names: Vec<String> = common::readmodel::pg(&app.config).await.query(sql, &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
        assert_eq!(names, ["read_models_ix_n_n", "read_models_text_simple"], "the query indexes of the swapped-in schema");
    }

    done(&app, app.post("/databases/s/classes/C/instances", json!({"id": "late", "data": {"n": 99}})).await).await;
    caught_up(&app).await;
    let after = instances(&app, "/databases/s/classes/C").await;
    assert_eq!(after.len(), 20, "the live projection carries on in the swapped-in schema: {after:?}");
}
