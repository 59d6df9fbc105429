//! The store contract, on SQLite and Postgres.

use ferrotune::db::{FileListQuery, FileRecord, FileStore, KeyStore, ListOrder, NewApiKey, SqlStore, Store};

use crate::helpers::{backends, backing, Backend};

async fn open(backend: Backend) -> (SqlStore, crate::helpers::Backing) {
    let backing = backing(backend).await;
    let store = SqlStore::connect(&backing.settings.database_url, 4).await.unwrap();
    store.migrate().await.unwrap();
    (store, backing)
}

fn file(id: &str, project: &str, purpose: &str) -> FileRecord {
    FileRecord {
        id: id.into(),
        project_id: project.into(),
        filename: format!("{id}.jsonl"),
        purpose: purpose.into(),
        bytes: 42,
        status: "processed".into(),
        status_details: None,
        format: Some("chat".into()),
        examples: Some(7),
        storage_key: format!("files/{project}/{id}"),
        created_at: 1_800_000_000,
    }
}

#[tokio::test]
async fn migrations_are_idempotent_and_ping_works() {
    for backend in backends() {
        let (store, _backing) = open(backend).await;
        store.migrate().await.unwrap();
        store.ping().await.unwrap();
    }
}

#[tokio::test]
async fn files_round_trip_and_are_scoped_to_their_project() {
    for backend in backends() {
        let (store, _backing) = open(backend).await;
        let a = file("file-a", ferrotune::db::DEFAULT_PROJECT_ID, "fine-tune");
        store.insert_file(&a).await.unwrap();
        assert_eq!(store.get_file(ferrotune::db::DEFAULT_PROJECT_ID, "file-a").await.unwrap(), Some(a.clone()));
        assert_eq!(store.get_file("proj-other", "file-a").await.unwrap(), None);
        assert_eq!(store.delete_file("proj-other", "file-a").await.unwrap(), None);
        assert_eq!(store.delete_file(ferrotune::db::DEFAULT_PROJECT_ID, "file-a").await.unwrap(), Some(a));
        assert_eq!(store.get_file(ferrotune::db::DEFAULT_PROJECT_ID, "file-a").await.unwrap(), None);
    }
}

#[tokio::test]
async fn a_file_row_needs_an_existing_project() {
    for backend in backends() {
        let (store, _backing) = open(backend).await;
        let orphan = file("file-x", "proj-missing", "fine-tune");
        assert!(store.insert_file(&orphan).await.is_err(), "{backend:?}: foreign keys are enforced");
    }
}

#[tokio::test]
async fn listing_pages_by_insertion_order_in_both_directions() {
    for backend in backends() {
        let (store, _backing) = open(backend).await;
        let project = ferrotune::db::DEFAULT_PROJECT_ID;
        for id in ["file-1", "file-2", "file-3", "file-4"] {
            store.insert_file(&file(id, project, "fine-tune")).await.unwrap();
        }
        let ids = |rows: Vec<FileRecord>| rows.into_iter().map(|f| f.id).collect::<Vec<_>>();
        let query = |after: Option<&str>, order| FileListQuery {
            after: after.map(str::to_string),
            limit: 2,
            order,
            purpose: None,
        };
        let first = store.list_files(project, &query(None, ListOrder::Desc)).await.unwrap().unwrap();
        assert_eq!(ids(first), ["file-4", "file-3", "file-2"], "limit + 1 rows");
        let next = store.list_files(project, &query(Some("file-3"), ListOrder::Desc)).await.unwrap().unwrap();
        assert_eq!(ids(next), ["file-2", "file-1"]);
        let asc = store.list_files(project, &query(Some("file-2"), ListOrder::Asc)).await.unwrap().unwrap();
        assert_eq!(ids(asc), ["file-3", "file-4"]);
        assert!(store.list_files(project, &query(Some("file-9"), ListOrder::Asc)).await.unwrap().is_none());
    }
}

#[tokio::test]
async fn creating_a_key_creates_its_project_in_the_same_transaction() {
    for backend in backends() {
        let (store, _backing) = open(backend).await;
        let new =
            |project, hash| NewApiKey { project_name: project, name: "k", key_hash: hash, display_prefix: "ft-abcdef" };
        let first = store.create_api_key(new("alpha", "hash-1")).await.unwrap();
        assert_eq!(first.project_name, "alpha");
        // A second key with the same hash fails, and its new project must not survive.
        assert!(store.create_api_key(new("beta", "hash-1")).await.is_err());
        let projects: Vec<(String,)> =
            sqlx::query_as("SELECT name FROM projects ORDER BY name").fetch_all(store.pool()).await.unwrap();
        let names: Vec<String> = projects.into_iter().map(|(n,)| n).collect();
        assert_eq!(names, ["alpha", "default"], "{backend:?}");

        let second = store.create_api_key(new("alpha", "hash-2")).await.unwrap();
        assert_eq!(second.project_id, first.project_id, "same project reused");
        assert_eq!(store.authenticate("hash-2").await.unwrap(), Some(first.project_id.clone()));
        assert_eq!(store.list_api_keys().await.unwrap().len(), 2);
        assert!(store.any_keys_configured().await.unwrap());
    }
}
