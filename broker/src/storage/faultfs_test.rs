use std::io;
use std::path::{Path, PathBuf};

use proptest::prelude::*;

use super::*;
use crate::storage::fs::{RealFs, read_file, write_file_durably};

fn read_all(file: &FileHandle) -> Vec<u8> {
    let len = usize::try_from(file.len().expect("len")).expect("small file");
    let mut buf = vec![0; len];
    let read = file.read_at(&mut buf, 0).expect("read");
    buf.truncate(read);
    buf
}

fn sorted(mut paths: Vec<PathBuf>) -> Vec<PathBuf> {
    paths.sort();
    paths
}

fn assert_kind<T: fmt::Debug>(result: io::Result<T>, kind: io::ErrorKind) {
    match result {
        Err(error) => assert_eq!(error.kind(), kind, "unexpected error {error}"),
        Ok(value) => panic!("expected {kind:?}, got Ok({value:?})"),
    }
}

fn assert_os_error<T: fmt::Debug>(result: io::Result<T>, raw_os_error: i32) {
    match result {
        Err(error) => assert_eq!(error.raw_os_error(), Some(raw_os_error), "got {error}"),
        Ok(value) => panic!("expected os error {raw_os_error}, got Ok({value:?})"),
    }
}

/// What every `FileSystem` must do, checked once and run against the real disk and `FaultFs`,
/// so that `FaultFs` cannot drift from the behaviour storage sees in production.
fn conformance(fs: &dyn FileSystem, root: &Path) {
    let directory = root.join("topics/orders/0");
    fs.create_dir_all(&directory).expect("create_dir_all");
    assert!(fs.exists(&directory));
    assert!(fs.exists(&root.join("topics")));
    // Creating what exists is fine.
    fs.create_dir_all(&directory).expect("create_dir_all again");

    // Opening a missing file without `create` fails, and creates nothing.
    let log_path = directory.join("0.log");
    assert_kind(fs.open(&log_path, false), io::ErrorKind::NotFound);
    assert!(!fs.exists(&log_path));

    // Round trips at offsets, with a gap that reads as zeros.
    let log = fs.open(&log_path, true).expect("create");
    assert!(fs.exists(&log_path));
    assert_eq!(log.len().unwrap(), 0);
    log.write_all_at(b"hello", 0).unwrap();
    log.write_all_at(b"world", 10).unwrap();
    assert_eq!(log.len().unwrap(), 15);
    assert_eq!(read_all(&log), b"hello\0\0\0\0\0world");
    log.write_all_at(b"J", 0).unwrap();
    let mut buf = [0; 4];
    assert_eq!(log.read_at(&mut buf, 0).unwrap(), 4);
    assert_eq!(&buf, b"Jell");
    // A read that runs past the end returns what there is; past the end, nothing.
    assert_eq!(log.read_at(&mut buf, 13).unwrap(), 2);
    assert_eq!(&buf[..2], b"ld");
    assert_eq!(log.read_at(&mut buf, 15).unwrap(), 0);
    assert_eq!(log.read_at(&mut buf, 1000).unwrap(), 0);

    // Another handle sees the same file, and opening with `create` does not truncate.
    let reader = fs.open(&log_path, true).expect("reopen");
    assert_eq!(read_all(&reader), b"Jello\0\0\0\0\0world");
    log.write_all_at(b"!", 15).unwrap();
    assert_eq!(reader.len().unwrap(), 16);

    // set_len extends with zeros and truncates.
    log.set_len(20).unwrap();
    assert_eq!(log.len().unwrap(), 20);
    assert_eq!(&read_all(&log)[15..], b"!\0\0\0\0");
    log.set_len(3).unwrap();
    assert_eq!(read_all(&log), b"Jel");
    log.sync_data().expect("sync_data");
    fs.sync_dir(&directory).expect("sync_dir");

    // Rename replaces the target, and handles follow the file, not the name.
    let index_path = directory.join("0.index");
    let index = fs.open(&index_path, true).unwrap();
    index.write_all_at(b"old index", 0).unwrap();
    let new_index_path = directory.join("0.index.new");
    let new_index = fs.open(&new_index_path, true).unwrap();
    new_index.write_all_at(b"new", 0).unwrap();
    fs.rename(&new_index_path, &index_path).expect("rename");
    assert!(!fs.exists(&new_index_path));
    assert_eq!(read_file(fs, &index_path).unwrap(), b"new");
    new_index.write_all_at(b"NEW", 0).unwrap();
    assert_eq!(read_file(fs, &index_path).unwrap(), b"NEW");
    // The replaced file lives on in its open handle.
    assert_eq!(read_all(&index), b"old index");
    assert_kind(
        fs.rename(&directory.join("missing"), &index_path),
        io::ErrorKind::NotFound,
    );

    // read_dir lists files and subdirectories, as full paths.
    fs.create_dir_all(&directory.join("snapshots")).unwrap();
    assert_eq!(
        sorted(fs.read_dir(&directory).unwrap()),
        sorted(vec![
            directory.join("0.index"),
            directory.join("0.log"),
            directory.join("snapshots"),
        ])
    );
    assert_eq!(
        fs.read_dir(&root.join("topics")).unwrap(),
        vec![root.join("topics/orders")]
    );
    assert!(
        fs.read_dir(&directory.join("snapshots"))
            .unwrap()
            .is_empty()
    );
    assert_kind(fs.read_dir(&root.join("missing")), io::ErrorKind::NotFound);

    // remove_file removes the name; open handles keep the file.
    fs.remove_file(&log_path).expect("remove_file");
    assert!(!fs.exists(&log_path));
    assert_eq!(read_all(&log), b"Jel");
    log.write_all_at(b"ly", 3).unwrap();
    assert_eq!(read_all(&log), b"Jelly");
    assert_kind(fs.remove_file(&log_path), io::ErrorKind::NotFound);
    assert_kind(fs.open(&log_path, false), io::ErrorKind::NotFound);

    // write_file_durably writes whole files, and replaces longer ones whole.
    let metadata_path = root.join("topics/orders/metadata");
    write_file_durably(fs, &metadata_path, b"partitions=12").expect("write_file_durably");
    assert_eq!(read_file(fs, &metadata_path).unwrap(), b"partitions=12");
    write_file_durably(fs, &metadata_path, b"p=3").expect("write_file_durably again");
    assert_eq!(read_file(fs, &metadata_path).unwrap(), b"p=3");
    assert!(!fs.exists(&root.join("topics/orders/metadata.tmp")));
    assert_kind(
        read_file(fs, &root.join("topics/orders/missing")),
        io::ErrorKind::NotFound,
    );

    // remove_dir_all takes the subtree.
    fs.remove_dir_all(&root.join("topics/orders"))
        .expect("remove_dir_all");
    assert!(!fs.exists(&directory));
    assert!(!fs.exists(&index_path));
    assert!(!fs.exists(&metadata_path));
    assert!(fs.exists(&root.join("topics")));
    assert!(fs.read_dir(&root.join("topics")).unwrap().is_empty());
    assert_kind(
        fs.remove_dir_all(&root.join("topics/orders")),
        io::ErrorKind::NotFound,
    );
}

#[test]
fn real_fs_conforms() {
    let root = tempfile::tempdir().expect("tempdir");
    conformance(&RealFs, root.path());
}

#[test]
fn fault_fs_conforms() {
    conformance(&FaultFs::new(), Path::new("/data"));
}

#[test]
fn fault_fs_conforms_with_relative_paths() {
    conformance(&FaultFs::new(), Path::new("./sluice-data"));
}

/// A filesystem with `/data` and one durably created, empty file in it.
fn with_durable_file() -> (FaultFs, PathBuf) {
    let fs = FaultFs::new();
    fs.create_dir_all(Path::new("/data")).unwrap();
    let path = PathBuf::from("/data/file");
    fs.open(&path, true).unwrap();
    fs.sync_dir(Path::new("/data")).unwrap();
    (fs, path)
}

#[test]
fn unsynced_writes_are_lost_on_crash() {
    let (fs, path) = with_durable_file();
    let file = fs.open(&path, false).unwrap();
    file.write_all_at(b"unsynced", 0).unwrap();
    fs.crash();
    assert!(fs.exists(&path));
    assert_eq!(read_file(&fs, &path).unwrap(), b"");
}

#[test]
fn synced_writes_survive_crash_and_later_writes_do_not() {
    let (fs, path) = with_durable_file();
    let file = fs.open(&path, false).unwrap();
    file.write_all_at(b"synced", 0).unwrap();
    file.sync_data().unwrap();
    assert_eq!(fs.read_durable(&path).unwrap(), b"synced");
    file.write_all_at(b"SY", 0).unwrap();
    file.write_all_at(b" and more", 6).unwrap();
    file.set_len(4).unwrap();
    fs.crash();
    assert_eq!(read_file(&fs, &path).unwrap(), b"synced");
}

#[test]
fn truncation_is_durable_only_after_sync() {
    let (fs, path) = with_durable_file();
    let file = fs.open(&path, false).unwrap();
    file.write_all_at(b"0123456789", 0).unwrap();
    file.sync_data().unwrap();
    file.set_len(4).unwrap();
    fs.crash();
    assert_eq!(read_file(&fs, &path).unwrap(), b"0123456789");
    let file = fs.open(&path, false).unwrap();
    file.set_len(4).unwrap();
    file.sync_data().unwrap();
    fs.crash();
    assert_eq!(read_file(&fs, &path).unwrap(), b"0123");
}

#[test]
fn file_created_without_directory_sync_vanishes_on_crash() {
    let fs = FaultFs::new();
    fs.create_dir_all(Path::new("/data")).unwrap();
    let path = Path::new("/data/new");
    let file = fs.open(path, true).unwrap();
    file.write_all_at(b"contents", 0).unwrap();
    // The contents are durable, but the name is not.
    file.sync_data().unwrap();
    assert_eq!(fs.read_durable(path), None);
    fs.crash();
    assert!(!fs.exists(path));
    assert!(fs.read_dir(Path::new("/data")).unwrap().is_empty());
}

#[test]
fn rename_without_directory_sync_is_undone_by_crash() {
    let fs = FaultFs::new();
    fs.create_dir_all(Path::new("/data")).unwrap();
    write_file_durably(&fs, Path::new("/data/a"), b"a").unwrap();
    write_file_durably(&fs, Path::new("/data/b"), b"b").unwrap();
    fs.rename(Path::new("/data/a"), Path::new("/data/b"))
        .unwrap();
    assert_eq!(read_file(&fs, Path::new("/data/b")).unwrap(), b"a");
    fs.crash();
    assert_eq!(read_file(&fs, Path::new("/data/a")).unwrap(), b"a");
    assert_eq!(read_file(&fs, Path::new("/data/b")).unwrap(), b"b");

    fs.rename(Path::new("/data/a"), Path::new("/data/b"))
        .unwrap();
    fs.sync_dir(Path::new("/data")).unwrap();
    fs.crash();
    assert!(!fs.exists(Path::new("/data/a")));
    assert_eq!(read_file(&fs, Path::new("/data/b")).unwrap(), b"a");
}

#[test]
fn removal_without_directory_sync_is_undone_by_crash() {
    let fs = FaultFs::new();
    fs.create_dir_all(Path::new("/data")).unwrap();
    write_file_durably(&fs, Path::new("/data/a"), b"a").unwrap();
    fs.remove_file(Path::new("/data/a")).unwrap();
    fs.crash();
    assert_eq!(read_file(&fs, Path::new("/data/a")).unwrap(), b"a");
    fs.remove_file(Path::new("/data/a")).unwrap();
    fs.sync_dir(Path::new("/data")).unwrap();
    fs.crash();
    assert!(!fs.exists(Path::new("/data/a")));
}

#[test]
fn sync_dir_covers_only_that_directory() {
    let fs = FaultFs::new();
    fs.create_dir_all(Path::new("/data/inner")).unwrap();
    fs.open(Path::new("/data/outer-file"), true).unwrap();
    fs.open(Path::new("/data/inner/inner-file"), true).unwrap();
    fs.sync_dir(Path::new("/data/inner")).unwrap();
    fs.crash();
    assert!(!fs.exists(Path::new("/data/outer-file")));
    assert!(fs.exists(Path::new("/data/inner/inner-file")));
}

#[test]
fn directories_are_durable_at_once() {
    let fs = FaultFs::new();
    fs.create_dir_all(Path::new("/data/a/b")).unwrap();
    fs.create_dir_all(Path::new("/data/gone")).unwrap();
    write_file_durably(&fs, Path::new("/data/gone/file"), b"x").unwrap();
    fs.remove_dir_all(Path::new("/data/gone")).unwrap();
    fs.crash();
    assert!(fs.exists(Path::new("/data/a/b")));
    assert!(!fs.exists(Path::new("/data/gone")));
    assert!(!fs.exists(Path::new("/data/gone/file")));
    // A directory created again where one was removed starts empty.
    fs.create_dir_all(Path::new("/data/gone")).unwrap();
    assert!(!fs.exists(Path::new("/data/gone/file")));
}

#[test]
fn write_file_durably_survives_crash() {
    let fs = FaultFs::new();
    fs.create_dir_all(Path::new("/data")).unwrap();
    let path = Path::new("/data/checkpoint");
    write_file_durably(&fs, path, b"offset=42").unwrap();
    fs.crash();
    assert_eq!(read_file(&fs, path).unwrap(), b"offset=42");
    assert_eq!(fs.read_durable(path).unwrap(), b"offset=42");
}

#[test]
fn failed_write_file_durably_leaves_the_previous_version() {
    let fs = FaultFs::new();
    fs.create_dir_all(Path::new("/data")).unwrap();
    let path = Path::new("/data/checkpoint");
    write_file_durably(&fs, path, b"offset=42").unwrap();
    fs.fail_syncs(FaultKind::Eio);
    assert_os_error(write_file_durably(&fs, path, b"offset=99"), 5);
    fs.crash();
    fs.clear_faults();
    assert_eq!(read_file(&fs, path).unwrap(), b"offset=42");
}

#[test]
fn tear_at_each_byte_keeps_exactly_that_prefix() {
    let original = b"0123456789";
    let write = b"abcdefghij";
    // Overlapping and extending the durable contents, and starting past their end.
    for offset in [4usize, 14] {
        for keep_bytes in 0..=write.len() + 2 {
            let (fs, path) = with_durable_file();
            let file = fs.open(&path, false).unwrap();
            file.write_all_at(original, 0).unwrap();
            file.sync_data().unwrap();
            file.write_all_at(b"lost, written before the last write", 0)
                .unwrap();
            file.write_all_at(write, offset as u64).unwrap();
            fs.tear_on_crash(keep_bytes);
            fs.crash();

            let kept = &write[..keep_bytes.min(write.len())];
            let mut expected = original.to_vec();
            if !kept.is_empty() {
                expected.resize(expected.len().max(offset + kept.len()), 0);
                expected[offset..offset + kept.len()].copy_from_slice(kept);
            }
            assert_eq!(
                read_file(&fs, &path).unwrap(),
                expected,
                "offset {offset}, keep {keep_bytes}"
            );
            assert_eq!(fs.read_durable(&path).unwrap(), expected);
        }
    }
}

#[test]
fn tear_examples() {
    let (fs, path) = with_durable_file();
    let file = fs.open(&path, false).unwrap();
    file.write_all_at(b"0123456789", 0).unwrap();
    file.sync_data().unwrap();
    file.write_all_at(b"abcdef", 4).unwrap();
    fs.tear_on_crash(2);
    fs.crash();
    assert_eq!(read_file(&fs, &path).unwrap(), b"0123ab6789");

    let file = fs.open(&path, false).unwrap();
    file.write_all_at(b"abcdef", 8).unwrap();
    fs.tear_on_crash(4);
    fs.crash();
    assert_eq!(read_file(&fs, &path).unwrap(), b"0123ab67abcd");
}

#[test]
fn tear_applies_to_the_most_recent_unsynced_write_of_any_file() {
    let fs = FaultFs::new();
    fs.create_dir_all(Path::new("/data")).unwrap();
    let first = fs.open(Path::new("/data/first"), true).unwrap();
    let second = fs.open(Path::new("/data/second"), true).unwrap();
    fs.sync_dir(Path::new("/data")).unwrap();

    // With both files unsynced, the later write is the torn one and the earlier is lost.
    first.write_all_at(b"first", 0).unwrap();
    second.write_all_at(b"second", 0).unwrap();
    fs.tear_on_crash(3);
    fs.crash();
    assert_eq!(read_file(&fs, Path::new("/data/first")).unwrap(), b"");
    assert_eq!(read_file(&fs, Path::new("/data/second")).unwrap(), b"sec");

    let first = fs.open(Path::new("/data/first"), false).unwrap();
    let second = fs.open(Path::new("/data/second"), false).unwrap();
    second.write_all_at(b"SECOND", 0).unwrap();
    first.write_all_at(b"FIRST", 0).unwrap();
    // Syncing the file with the latest write makes the earlier write to the other file the
    // most recent unsynced one.
    first.sync_data().unwrap();
    fs.tear_on_crash(3);
    fs.crash();
    assert_eq!(read_file(&fs, Path::new("/data/first")).unwrap(), b"FIRST");
    assert_eq!(read_file(&fs, Path::new("/data/second")).unwrap(), b"SEC");
}

#[test]
fn tear_is_disarmed_by_the_crash_it_applies_to() {
    let (fs, path) = with_durable_file();
    let file = fs.open(&path, false).unwrap();
    file.write_all_at(b"torn", 0).unwrap();
    fs.tear_on_crash(2);
    fs.crash();
    assert_eq!(read_file(&fs, &path).unwrap(), b"to");

    let file = fs.open(&path, false).unwrap();
    file.write_all_at(b"plain", 0).unwrap();
    fs.crash();
    assert_eq!(read_file(&fs, &path).unwrap(), b"to");
}

#[test]
fn tear_without_unsynced_write_is_a_plain_crash() {
    let (fs, path) = with_durable_file();
    let file = fs.open(&path, false).unwrap();
    file.write_all_at(b"synced", 0).unwrap();
    file.sync_data().unwrap();
    fs.tear_on_crash(3);
    fs.crash();
    assert_eq!(read_file(&fs, &path).unwrap(), b"synced");
}

#[test]
fn enospc_after_n_bytes_writes_the_part_that_fits_and_fails() {
    let (fs, path) = with_durable_file();
    let file = fs.open(&path, false).unwrap();
    fs.fail_writes(FaultKind::Enospc, Some(10));
    file.write_all_at(b"012345", 0).unwrap();
    assert_os_error(file.write_all_at(b"6789ab", 6), 28);
    assert_eq!(read_all(&file), b"0123456789");
    // The disk stays full: nothing more goes in, but writing nothing still works.
    assert_os_error(file.write_all_at(b"x", 10), 28);
    file.write_all_at(b"", 10).unwrap();
    assert_eq!(read_all(&file), b"0123456789");
    // The budget is shared by every file.
    fs.open(Path::new("/data/other"), true).unwrap();
    let other = fs.open(Path::new("/data/other"), false).unwrap();
    assert_os_error(other.write_all_at(b"y", 0), 28);
    assert_eq!(other.len().unwrap(), 0);

    fs.clear_faults();
    file.write_all_at(b"ab", 10).unwrap();
    assert_eq!(read_all(&file), b"0123456789ab");
}

#[test]
fn a_sparing_write_fault_leaves_the_spared_files_alone() {
    let (fs, path) = with_durable_file();
    fs.open(Path::new("/data/seg.log"), true).unwrap();
    let spared = fs.open(Path::new("/data/seg.log"), false).unwrap();
    let other = fs.open(&path, false).unwrap();
    fs.fail_writes_sparing(FaultKind::Enospc, |path| {
        path.extension().is_some_and(|extension| extension == "log")
    });
    spared.write_all_at(b"fits", 0).unwrap();
    assert_os_error(other.write_all_at(b"x", 0), 28);
    // Spared writes take nothing from the others: still full.
    spared.write_all_vectored_at(&[b"more", b"!"], 4).unwrap();
    assert_os_error(other.write_all_at(b"y", 0), 28);
    assert_eq!(read_all(&spared), b"fitsmore!");
    assert_eq!(other.len().unwrap(), 0);
    fs.clear_faults();
    other.write_all_at(b"z", 0).unwrap();
}

#[test]
fn enospc_partial_write_is_the_write_a_tear_sees() {
    let (fs, path) = with_durable_file();
    let file = fs.open(&path, false).unwrap();
    fs.fail_writes(FaultKind::Enospc, Some(3));
    assert_os_error(file.write_all_at(b"abcdef", 0), 28);
    fs.tear_on_crash(100);
    fs.crash();
    assert_eq!(read_file(&fs, &path).unwrap(), b"abc");
}

#[test]
fn write_faults_without_budget_fail_at_once() {
    let (fs, path) = with_durable_file();
    let file = fs.open(&path, false).unwrap();
    fs.fail_writes(FaultKind::Eio, None);
    assert_os_error(file.write_all_at(b"abc", 0), 5);
    assert_eq!(file.len().unwrap(), 0);
    // set_len does not allocate, so it still works.
    file.set_len(5).unwrap();
    assert_eq!(FaultKind::Eio.to_io_error().raw_os_error(), Some(5));
    assert_eq!(FaultKind::Enospc.to_io_error().raw_os_error(), Some(28));
}

#[test]
fn failed_fsync_does_not_make_data_durable() {
    let (fs, path) = with_durable_file();
    let file = fs.open(&path, false).unwrap();
    file.write_all_at(b"durable", 0).unwrap();
    file.sync_data().unwrap();
    file.write_all_at(b"DURABLE?", 0).unwrap();
    fs.fail_syncs(FaultKind::Eio);
    assert_os_error(file.sync_data(), 5);
    assert_eq!(fs.sync_count(), 1);
    // Reads still see the write; the disk does not have it.
    assert_eq!(read_all(&file), b"DURABLE?");
    assert_eq!(fs.read_durable(&path).unwrap(), b"durable");
    // Even once syncs work again, a crash before the next sync loses the write.
    fs.clear_faults();
    fs.crash();
    assert_eq!(read_file(&fs, &path).unwrap(), b"durable");
}

#[test]
fn failed_directory_sync_does_not_make_entries_durable() {
    let fs = FaultFs::new();
    fs.create_dir_all(Path::new("/data")).unwrap();
    fs.open(Path::new("/data/new"), true).unwrap();
    fs.fail_syncs(FaultKind::Eio);
    assert_os_error(fs.sync_dir(Path::new("/data")), 5);
    fs.clear_faults();
    fs.crash();
    assert!(!fs.exists(Path::new("/data/new")));
}

#[test]
fn handles_opened_before_a_crash_fail_with_eio() {
    let (fs, path) = with_durable_file();
    let file = fs.open(&path, false).unwrap();
    file.write_all_at(b"x", 0).unwrap();
    fs.crash();
    let mut buf = [0; 1];
    assert_os_error(file.read_at(&mut buf, 0), 5);
    assert_os_error(file.write_all_at(b"y", 0), 5);
    assert_os_error(file.sync_data(), 5);
    assert_os_error(file.len(), 5);
    assert_os_error(file.set_len(0), 5);
    // The dead handle changed nothing, and a new handle works.
    let file = fs.open(&path, false).unwrap();
    file.write_all_at(b"z", 0).unwrap();
    assert_eq!(read_all(&file), b"z");
}

#[test]
fn sync_count_counts_successful_sync_data_calls() {
    let (fs, path) = with_durable_file();
    assert_eq!(fs.sync_count(), 0);
    let file = fs.open(&path, false).unwrap();
    file.sync_data().unwrap();
    file.write_all_at(b"a", 0).unwrap();
    file.sync_data().unwrap();
    fs.sync_dir(Path::new("/data")).unwrap();
    assert_eq!(fs.sync_count(), 2);
    fs.fail_syncs(FaultKind::Eio);
    assert!(file.sync_data().is_err());
    assert_eq!(fs.sync_count(), 2);
    // write_file_durably syncs the file once (plus the directory, not counted).
    fs.clear_faults();
    write_file_durably(&fs, Path::new("/data/meta"), b"m").unwrap();
    assert_eq!(fs.sync_count(), 3);
    // Clones share the filesystem, and the count.
    assert_eq!(fs.clone().sync_count(), 3);
}

#[test]
fn read_durable_reports_what_a_crash_would_leave() {
    let (fs, path) = with_durable_file();
    assert_eq!(fs.read_durable(&path).unwrap(), b"");
    assert_eq!(fs.read_durable(Path::new("/data/missing")), None);
    assert_eq!(fs.read_durable(Path::new("/data")), None);
    let file = fs.open(&path, false).unwrap();
    file.write_all_at(b"unsynced", 0).unwrap();
    assert_eq!(fs.read_durable(&path).unwrap(), b"");
}

#[test]
fn renaming_a_directory_moves_its_files() {
    let fs = FaultFs::new();
    fs.create_dir_all(Path::new("/data/topic/0")).unwrap();
    write_file_durably(&fs, Path::new("/data/topic/0/log"), b"records").unwrap();
    let file = fs.open(Path::new("/data/topic/0/log"), false).unwrap();
    fs.rename(Path::new("/data/topic"), Path::new("/data/topic-deleted"))
        .unwrap();
    assert!(!fs.exists(Path::new("/data/topic")));
    assert_eq!(
        read_file(&fs, Path::new("/data/topic-deleted/0/log")).unwrap(),
        b"records"
    );
    assert_eq!(read_all(&file), b"records");
    // Directory renames are durable at once, and the files' durable entries went along.
    fs.crash();
    assert_eq!(
        read_file(&fs, Path::new("/data/topic-deleted/0/log")).unwrap(),
        b"records"
    );
}

#[test]
fn misuse_returns_errors() {
    let fs = FaultFs::new();
    fs.create_dir_all(Path::new("/data/dir")).unwrap();
    fs.open(Path::new("/data/file"), true).unwrap();
    assert_kind(
        fs.open(Path::new("/missing/file"), true),
        io::ErrorKind::NotFound,
    );
    assert_kind(
        fs.open(Path::new("/data/dir"), true),
        io::ErrorKind::IsADirectory,
    );
    assert_kind(
        fs.open(Path::new("/data/../etc/passwd"), true),
        io::ErrorKind::InvalidInput,
    );
    assert!(!fs.exists(Path::new("/data/../data")));
    assert_kind(
        fs.create_dir_all(Path::new("/data/file")),
        io::ErrorKind::AlreadyExists,
    );
    assert_kind(
        fs.create_dir_all(Path::new("/data/file/below")),
        io::ErrorKind::NotADirectory,
    );
    assert_kind(
        fs.read_dir(Path::new("/data/file")),
        io::ErrorKind::NotADirectory,
    );
    assert_kind(
        fs.remove_file(Path::new("/data/dir")),
        io::ErrorKind::IsADirectory,
    );
    assert_kind(
        fs.remove_dir_all(Path::new("/data/file")),
        io::ErrorKind::NotADirectory,
    );
    assert_kind(
        fs.remove_dir_all(Path::new("/")),
        io::ErrorKind::InvalidInput,
    );
    assert_kind(
        fs.rename(Path::new("/data/file"), Path::new("/data/dir")),
        io::ErrorKind::IsADirectory,
    );
    assert_kind(
        fs.rename(Path::new("/data/file"), Path::new("/missing/file")),
        io::ErrorKind::NotFound,
    );
    assert_kind(
        fs.rename(Path::new("/data"), Path::new("/data/dir/inside")),
        io::ErrorKind::InvalidInput,
    );
    assert_kind(
        fs.rename(Path::new("/data/dir"), Path::new("/data/file")),
        io::ErrorKind::NotADirectory,
    );
    fs.create_dir_all(Path::new("/full/child")).unwrap();
    assert_kind(
        fs.rename(Path::new("/data/dir"), Path::new("/full")),
        io::ErrorKind::DirectoryNotEmpty,
    );
    assert_kind(fs.sync_dir(Path::new("/missing")), io::ErrorKind::NotFound);
    assert_kind(
        fs.sync_dir(Path::new("/data/file")),
        io::ErrorKind::NotADirectory,
    );
    // Renaming onto itself changes nothing.
    fs.rename(Path::new("/data/file"), Path::new("/data/file"))
        .unwrap();
    assert!(fs.exists(Path::new("/data/file")));

    // Absurd offsets fail instead of allocating.
    let file = fs.open(Path::new("/data/file"), false).unwrap();
    assert_kind(
        file.write_all_at(b"x", u64::MAX),
        io::ErrorKind::FileTooLarge,
    );
    assert_kind(
        file.write_all_at(b"x", MAXIMUM_FILE_BYTES),
        io::ErrorKind::FileTooLarge,
    );
    assert_kind(file.set_len(u64::MAX), io::ErrorKind::FileTooLarge);
    let mut buf = [0; 4];
    assert_eq!(file.read_at(&mut buf, u64::MAX).unwrap(), 0);
    assert_eq!(file.len().unwrap(), 0);
}

#[test]
fn clones_share_one_filesystem_across_threads() {
    let fs = FaultFs::new();
    fs.create_dir_all(Path::new("/data")).unwrap();
    let file = fs.open(Path::new("/data/shared"), true).unwrap();
    let threads: Vec<_> = (0..4u8)
        .map(|thread_index| {
            let fs = fs.clone();
            let file = Arc::clone(&file);
            std::thread::spawn(move || {
                let own = fs
                    .open(&PathBuf::from(format!("/data/own-{thread_index}")), true)
                    .unwrap();
                for round in 0..100u64 {
                    let offset = (round * 4 + u64::from(thread_index)) * 8;
                    file.write_all_at(&[thread_index; 8], offset).unwrap();
                    own.write_all_at(&[thread_index], round).unwrap();
                }
                file.sync_data().unwrap();
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let contents = read_all(&file);
    assert_eq!(contents.len(), 400 * 8);
    for (chunk_index, chunk) in contents.chunks(8).enumerate() {
        assert_eq!(chunk, [(chunk_index % 4) as u8; 8]);
    }
    assert_eq!(fs.read_dir(Path::new("/data")).unwrap().len(), 5);
    assert_eq!(fs.sync_count(), 4);
}

/// One step of the model test below.
#[derive(Clone, Debug)]
enum Operation {
    Write { offset: usize, bytes: Vec<u8> },
    SetLen(usize),
    Sync,
    Crash { tear_keep_bytes: Option<usize> },
}

fn operation_strategy() -> impl Strategy<Value = Operation> {
    prop_oneof![
        4 => (0usize..48, proptest::collection::vec(any::<u8>(), 0..16))
            .prop_map(|(offset, bytes)| Operation::Write { offset, bytes }),
        1 => (0usize..64).prop_map(Operation::SetLen),
        2 => Just(Operation::Sync),
        1 => proptest::option::of(0usize..20)
            .prop_map(|tear_keep_bytes| Operation::Crash { tear_keep_bytes }),
    ]
}

proptest! {
    /// Checks FaultFs against the plainest model of one file (whole copies on sync and crash),
    /// which guards the incremental sync that copies only the changed tail.
    #[test]
    fn one_file_matches_a_plain_model(
        operations in proptest::collection::vec(operation_strategy(), 0..40)
    ) {
        let (fs, path) = with_durable_file();
        let mut file = fs.open(&path, false).unwrap();
        let mut current = Vec::new();
        let mut durable = Vec::new();
        let mut last_unsynced_write: Option<(usize, Vec<u8>)> = None;
        for operation in operations {
            match operation {
                Operation::Write { offset, bytes } => {
                    file.write_all_at(&bytes, offset as u64).unwrap();
                    if !bytes.is_empty() {
                        current.resize(current.len().max(offset + bytes.len()), 0);
                        current[offset..offset + bytes.len()].copy_from_slice(&bytes);
                        last_unsynced_write = Some((offset, bytes));
                    }
                }
                Operation::SetLen(len) => {
                    file.set_len(len as u64).unwrap();
                    current.resize(len, 0);
                }
                Operation::Sync => {
                    file.sync_data().unwrap();
                    durable.clone_from(&current);
                    last_unsynced_write = None;
                }
                Operation::Crash { tear_keep_bytes } => {
                    if let Some(keep_bytes) = tear_keep_bytes {
                        fs.tear_on_crash(keep_bytes);
                        if let Some((offset, bytes)) = &last_unsynced_write {
                            let kept = &bytes[..keep_bytes.min(bytes.len())];
                            if !kept.is_empty() {
                                durable.resize(durable.len().max(offset + kept.len()), 0);
                                durable[*offset..offset + kept.len()].copy_from_slice(kept);
                            }
                        }
                    }
                    fs.crash();
                    current.clone_from(&durable);
                    last_unsynced_write = None;
                    file = fs.open(&path, false).unwrap();
                }
            }
            prop_assert_eq!(read_all(&file), current.clone());
            prop_assert_eq!(fs.read_durable(&path).unwrap(), durable.clone());
        }
    }
}
