-- chunkfs metadata schema.
--
-- Applied by `chunkfs mkfs`; every statement is idempotent, so running mkfs
-- twice changes nothing. Times are nanoseconds since the Unix epoch (bigint)
-- where the filesystem reports them, timestamptz where only the cluster uses
-- them. Names and symlink targets are bytes: a POSIX name is any byte string
-- without NUL or '/'.

CREATE TABLE IF NOT EXISTS schema_version (
    -- One row: the version of this schema the database holds.
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    -- Bumped by every schema change that needs a migration; `chunkfs mkfs`
    -- on an older filesystem applies the change (see the end of this file).
    version integer NOT NULL
);

CREATE TABLE IF NOT EXISTS settings (
    -- One row: cluster-wide settings, fixed at mkfs.
    -- (singleton: always true, so the table holds one row.)
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    -- Copies of every chunk object (R); each on a distinct storage node.
    replicas integer NOT NULL DEFAULT 2 CHECK (replicas BETWEEN 1 AND 16),
    -- Largest file size in bytes; a larger write or truncate fails with EFBIG.
    max_file_size bigint NOT NULL DEFAULT 10737418240 CHECK (max_file_size > 0),
    -- Bearer token every node request but health must carry (hex, 256 bits).
    cluster_token text NOT NULL CHECK (cluster_token ~ '^[0-9a-f]{64}$'),
    -- Seconds an upload session may stay open before gc expires it.
    upload_ttl_s integer NOT NULL DEFAULT 3600 CHECK (upload_ttl_s > 0),
    -- When mkfs made the filesystem.
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS inodes (
    -- One row per file, directory, symlink or special file. ino 1 is the root.
    ino bigint PRIMARY KEY CHECK (ino >= 1),
    -- st_mode: file type bits and permission bits.
    mode integer NOT NULL,
    -- Owner and group ids.
    uid bigint NOT NULL CHECK (uid >= 0),
    gid bigint NOT NULL CHECK (gid >= 0),
    -- Number of dentries naming this inode (plus "." and children's ".." for directories).
    nlink integer NOT NULL CHECK (nlink >= 0),
    -- Content length in bytes (regular files), target length (symlinks), 0 otherwise.
    size bigint NOT NULL DEFAULT 0 CHECK (size >= 0),
    -- Device number of character and block special files.
    rdev bigint NOT NULL DEFAULT 0,
    -- Last access, content change and inode change, in ns since the epoch.
    atime_ns bigint NOT NULL,
    mtime_ns bigint NOT NULL,
    ctime_ns bigint NOT NULL,
    -- Bumped by every content commit; caches of the chunk map are keyed by it.
    version bigint NOT NULL DEFAULT 0,
    -- SHA-256 of the whole content at this version (NULL until the first commit).
    sha256 bytea CHECK (sha256 IS NULL OR length(sha256) = 32)
);
CREATE SEQUENCE IF NOT EXISTS inode_seq START 2 OWNED BY inodes.ino;

CREATE TABLE IF NOT EXISTS dentries (
    -- A name in a directory. Hard links are several dentries of one inode.
    -- The directory holding the name, and the inode it names.
    parent bigint NOT NULL REFERENCES inodes (ino),
    name bytea NOT NULL CHECK (length(name) BETWEEN 1 AND 255
                               AND position('\x00'::bytea IN name) = 0
                               AND position('\x2f'::bytea IN name) = 0),
    ino bigint NOT NULL REFERENCES inodes (ino),
    -- Stable readdir cookie: entries are listed in this order, so a listing
    -- that runs while names come and go neither skips nor repeats one.
    cookie bigserial NOT NULL UNIQUE,
    PRIMARY KEY (parent, name)
);
CREATE INDEX IF NOT EXISTS dentries_ino ON dentries (ino);
CREATE INDEX IF NOT EXISTS dentries_parent_cookie ON dentries (parent, cookie);

CREATE TABLE IF NOT EXISTS symlinks (
    -- The target of a symbolic link (at most 4095 bytes, as PATH_MAX - 1).
    ino bigint PRIMARY KEY REFERENCES inodes (ino) ON DELETE CASCADE,
    -- The path the link points at, as bytes.
    target bytea NOT NULL CHECK (length(target) BETWEEN 1 AND 4095)
);

CREATE TABLE IF NOT EXISTS xattrs (
    -- Extended attributes, e.g. "user.comment" -> bytes.
    -- The inode, the attribute's full name (namespace included) and value.
    ino bigint NOT NULL REFERENCES inodes (ino) ON DELETE CASCADE,
    name bytea NOT NULL CHECK (length(name) BETWEEN 1 AND 255),
    value bytea NOT NULL CHECK (length(value) <= 65536),
    PRIMARY KEY (ino, name)
);

CREATE TABLE IF NOT EXISTS storage_nodes (
    -- A storage node process. Its id is kept in its data directory, so a
    -- restart keeps its identity.
    node_id text PRIMARY KEY CHECK (node_id ~ '^[0-9a-f]{16}$'),
    -- Where the node's HTTP API listens, e.g. http://127.0.0.1:7001.
    base_url text NOT NULL,
    -- 'active' while it runs; 'stopped' after a clean shutdown.
    status text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'stopped')),
    -- Set by `chunkfs node drain`: takes no new replicas, and rebalance moves
    -- its replicas away, so that it can be removed.
    draining boolean NOT NULL DEFAULT false,
    -- Space as the node last reported it (bytes): its capacity, what its
    -- chunks use, what is still free; and how many chunk objects it holds.
    capacity_bytes bigint NOT NULL DEFAULT 0 CHECK (capacity_bytes >= 0),
    used_bytes bigint NOT NULL DEFAULT 0 CHECK (used_bytes >= 0),
    free_bytes bigint NOT NULL DEFAULT 0 CHECK (free_bytes >= 0),
    chunk_count bigint NOT NULL DEFAULT 0 CHECK (chunk_count >= 0),
    -- When the node first registered.
    registered_at timestamptz NOT NULL DEFAULT now(),
    -- Moved by every heartbeat; a node is live while this is fresh.
    last_heartbeat timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS storage_nodes_heartbeat ON storage_nodes (last_heartbeat);

CREATE TABLE IF NOT EXISTS hash_ring_vnodes (
    -- The consistent-hash ring: 150 virtual nodes per storage node, each at
    -- a 64-bit position (signed, as PostgreSQL has no unsigned bigint).
    hash bigint NOT NULL,
    -- The owning node, and the vnode's number (0..149) within it.
    node_id text NOT NULL REFERENCES storage_nodes (node_id) ON DELETE CASCADE,
    vnode integer NOT NULL CHECK (vnode >= 0),
    PRIMARY KEY (node_id, vnode)
);
CREATE INDEX IF NOT EXISTS hash_ring_vnodes_hash ON hash_ring_vnodes (hash);

CREATE TABLE IF NOT EXISTS chunk_objects (
    -- A content-addressed chunk object; its id is the SHA-256 of its bytes,
    -- so identical chunks are stored once and a PUT is idempotent.
    chunk_id bytea PRIMARY KEY CHECK (length(chunk_id) = 32),
    -- Its length in bytes, and when it was first committed.
    length bigint NOT NULL CHECK (length >= 0),
    created_at timestamptz NOT NULL DEFAULT now(),
    -- Its ring position (signed 64-bit): where the ring places its replicas.
    -- The first 8 bytes of its id, or for the small chunks of a small file
    -- the file's own position, so that they share nodes (ring.py).
    ring_key bigint NOT NULL,
    -- For a chunk longer than one 1 MiB block: the SHA-256 of each block,
    -- concatenated, so that range reads are verified too. NULL otherwise.
    block_sha256 bytea CHECK (length(block_sha256) = 32 * ((length + 1048575) / 1048576))
);

CREATE TABLE IF NOT EXISTS chunk_replicas (
    -- Which storage nodes hold (durably, fsynced) a copy of a chunk object.
    -- The chunk object, and a node holding a copy.
    chunk_id bytea NOT NULL REFERENCES chunk_objects (chunk_id) ON DELETE CASCADE,
    node_id text NOT NULL REFERENCES storage_nodes (node_id),
    PRIMARY KEY (chunk_id, node_id)
);
CREATE INDEX IF NOT EXISTS chunk_replicas_node ON chunk_replicas (node_id);

CREATE TABLE IF NOT EXISTS chunks (
    -- The chunk map of a file's committed version: six contiguous extents
    -- (index 0..5) that tile [0, size).
    -- The file, and the chunk's place among its six.
    ino bigint NOT NULL REFERENCES inodes (ino) ON DELETE CASCADE,
    chunk_index smallint NOT NULL CHECK (chunk_index BETWEEN 0 AND 5),
    -- Byte offset of the extent in the file, and its length in bytes.
    "offset" bigint NOT NULL CHECK ("offset" >= 0),
    length bigint NOT NULL CHECK (length >= 0),
    -- SHA-256 of the extent's bytes: the chunk object holding them; NULL
    -- for a hole (a non-empty extent of zeros only, stored on no node).
    chunk_id bytea REFERENCES chunk_objects (chunk_id),
    PRIMARY KEY (ino, chunk_index)
);
CREATE INDEX IF NOT EXISTS chunks_chunk_id ON chunks (chunk_id);

CREATE TABLE IF NOT EXISTS upload_sessions (
    -- One commit of a file in flight: the chunk objects it pushes are
    -- protected from gc until it completes, fails or expires.
    session_id bigserial PRIMARY KEY,
    -- The file being committed (no foreign key: the file may be removed meanwhile).
    ino bigint NOT NULL,
    -- pending -> uploading -> completed, or failed.
    status text NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'uploading', 'completed', 'failed')),
    -- When it opened, and when gc may treat it as dead.
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS upload_sessions_expires ON upload_sessions (expires_at);

CREATE TABLE IF NOT EXISTS upload_session_chunks (
    -- The chunk objects an upload session is pushing.
    -- The session, and one chunk object it pushes.
    session_id bigint NOT NULL REFERENCES upload_sessions (session_id) ON DELETE CASCADE,
    chunk_id bytea NOT NULL CHECK (length(chunk_id) = 32),
    PRIMARY KEY (session_id, chunk_id)
);
CREATE INDEX IF NOT EXISTS upload_session_chunks_chunk ON upload_session_chunks (chunk_id);

-- Version 2: rename_file.
--
-- A rename of anything but a directory, over anything but one, in one round
-- trip: lock both parent directories in inode order (as every namespace
-- change does, so two renames cannot deadlock), then move the dentry with a
-- snapshot taken after the locks (each statement of a PL/pgSQL function takes
-- its own). Returns no row when a parent is not a live directory or the old
-- name does not exist; done = false when the rename needs the general path (a
-- directory, RENAME_NOREPLACE onto a taken name, a name of the same inode);
-- the caller then takes that path, which also reports the errors. Otherwise
-- done, the moved inode, and the attributes of the inode whose name was taken
-- over (its ino NULL when there was none). t: nanoseconds since the epoch.
-- A taken name's dentry is pointed at the moved inode, so no two rows ever
-- hold the same name.
-- 61440 and 16384 are S_IFMT and S_IFDIR.
CREATE OR REPLACE FUNCTION rename_file(
    _old_parent bigint, _old_name bytea, _new_parent bigint, _new_name bytea,
    _t bigint, _noreplace boolean)
RETURNS TABLE (done boolean, moved bigint, ino bigint, mode integer, uid bigint,
               gid bigint, nlink integer, size bigint, rdev bigint, atime_ns bigint,
               mtime_ns bigint, ctime_ns bigint, version bigint)
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
BEGIN
    PERFORM 1 FROM inodes WHERE ino IN (_old_parent, _new_parent) ORDER BY ino FOR UPDATE;
    IF (SELECT count(*) FROM inodes WHERE ino IN (_old_parent, _new_parent)
            AND nlink > 0 AND mode & 61440 = 16384)
       <> 1 + (_old_parent <> _new_parent)::integer THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH src AS (
        SELECT d.ino, i.mode FROM dentries d JOIN inodes i ON i.ino = d.ino
        WHERE d.parent = _old_parent AND d.name = _old_name FOR UPDATE OF i
    ), dst AS (
        SELECT d.ino, i.mode FROM dentries d JOIN inodes i ON i.ino = d.ino
        WHERE d.parent = _new_parent AND d.name = _new_name FOR UPDATE OF i
    ), go AS (
        SELECT src.ino AS src_ino, dst.ino AS dst_ino FROM src LEFT JOIN dst ON true
        WHERE src.mode & 61440 <> 16384 AND (dst.ino IS NULL OR (
            dst.ino <> src.ino AND NOT _noreplace AND dst.mode & 61440 <> 16384))
    ), renamed AS (
        UPDATE dentries SET parent = _new_parent, name = _new_name
        WHERE parent = _old_parent AND name = _old_name
        AND EXISTS (SELECT 1 FROM go WHERE dst_ino IS NULL)
    ), repointed AS (
        UPDATE dentries SET ino = (SELECT src_ino FROM go)
        WHERE parent = _new_parent AND name = _new_name
        AND EXISTS (SELECT 1 FROM go WHERE dst_ino IS NOT NULL)
    ), dropped AS (
        DELETE FROM dentries WHERE parent = _old_parent AND name = _old_name
        AND EXISTS (SELECT 1 FROM go WHERE dst_ino IS NOT NULL)
    ), replaced AS (
        UPDATE inodes SET nlink = nlink - 1, ctime_ns = _t
        WHERE ino = (SELECT dst_ino FROM go)
        RETURNING ino, mode, uid, gid, nlink, size, rdev, atime_ns, mtime_ns, ctime_ns, version
    ), touched AS (
        UPDATE inodes SET ctime_ns = _t, mtime_ns = CASE WHEN ino = (SELECT src_ino FROM go)
            THEN mtime_ns ELSE _t END
        WHERE EXISTS (SELECT 1 FROM go) AND ino IN (_old_parent, _new_parent, (SELECT src_ino FROM go))
    )
    SELECT EXISTS (SELECT 1 FROM go), src.ino, r.ino, r.mode, r.uid, r.gid, r.nlink,
           r.size, r.rdev, r.atime_ns, r.mtime_ns, r.ctime_ns, r.version
    FROM src LEFT JOIN replaced r ON true;
END
$fn$;

INSERT INTO schema_version (version) VALUES (2)
    ON CONFLICT (singleton) DO UPDATE SET version = greatest(schema_version.version, 2);

-- Version 3: holes. A chunk row without a chunk object is an extent of zeros.
ALTER TABLE chunks ALTER COLUMN chunk_id DROP NOT NULL;

INSERT INTO schema_version (version) VALUES (3)
    ON CONFLICT (singleton) DO UPDATE SET version = greatest(schema_version.version, 3);

-- Version 4: across hosts. A cluster id that nodes record in their data
-- directory (a directory of another cluster is refused), and each node's
-- failure domain: the R replicas of a chunk go to R distinct zones.
ALTER TABLE settings ADD COLUMN IF NOT EXISTS
    cluster_id text NOT NULL DEFAULT replace(gen_random_uuid()::text, '-', '');
ALTER TABLE storage_nodes ADD COLUMN IF NOT EXISTS zone text NOT NULL DEFAULT '';

INSERT INTO schema_version (version) VALUES (4)
    ON CONFLICT (singleton) DO UPDATE SET version = greatest(schema_version.version, 4);

-- Version 5: the S3 gateway (`chunkfs gateway`).
CREATE TABLE IF NOT EXISTS access_keys (
    -- An S3 access key: its id (20 upper-case letters and digits) and secret
    -- (40 characters), the uid and gid its requests act as, and a label.
    access_key_id text PRIMARY KEY CHECK (access_key_id ~ '^[A-Z0-9]{20}$'),
    secret text NOT NULL CHECK (length(secret) = 40),
    uid bigint NOT NULL CHECK (uid >= 0),
    gid bigint NOT NULL CHECK (gid >= 0),
    name text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS etags (
    -- A file's S3 ETag (quoted: the MD5 of its bytes, or for a multipart
    -- upload the MD5 of its parts' MD5s and "-N"), valid while the file's
    -- content version is still this one; a later commit makes it stale.
    ino bigint PRIMARY KEY REFERENCES inodes (ino) ON DELETE CASCADE,
    version bigint NOT NULL,
    etag text NOT NULL
);

CREATE TABLE IF NOT EXISTS multipart_uploads (
    -- An S3 multipart upload in progress. Its parts' chunk objects are
    -- protected by its upload session (gone with it: expired, completed or
    -- aborted), whose ino is the bucket's directory.
    upload_id text PRIMARY KEY CHECK (upload_id ~ '^[0-9a-f]{32}$'),
    session_id bigint NOT NULL UNIQUE REFERENCES upload_sessions (session_id) ON DELETE CASCADE,
    -- The bucket (a directory at the root) and the key (UTF-8) it will make.
    bucket text NOT NULL,
    key text NOT NULL,
    -- Who started it, and the object's headers kept as xattrs at completion
    -- (lower-case name -> value: content-type, x-amz-meta-*).
    uid bigint NOT NULL,
    gid bigint NOT NULL,
    headers jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS multipart_uploads_key ON multipart_uploads (bucket, key);

CREATE TABLE IF NOT EXISTS multipart_parts (
    -- One uploaded part (1..10000): its size in bytes and MD5, kept as
    -- pieces (chunk objects of at most 8 MiB, in order) on the nodes listed.
    upload_id text NOT NULL REFERENCES multipart_uploads (upload_id) ON DELETE CASCADE,
    part_number integer NOT NULL CHECK (part_number BETWEEN 1 AND 10000),
    size bigint NOT NULL CHECK (size >= 0),
    md5 bytea NOT NULL CHECK (length(md5) = 16),
    -- Per piece: its chunk id, length, block digests (NULL up to one block)
    -- and holders (a JSON array of node ids).
    piece_ids bytea[] NOT NULL,
    piece_lengths bigint[] NOT NULL,
    piece_blocks bytea[] NOT NULL,
    piece_nodes jsonb NOT NULL,
    modified_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (upload_id, part_number)
);

INSERT INTO schema_version (version) VALUES (5)
    ON CONFLICT (singleton) DO UPDATE SET version = greatest(schema_version.version, 5);

-- Version 6: heartbeats through a metadata outage (a PostgreSQL failover).
-- While no node manages a heartbeat for quiet_s seconds (PostgreSQL is
-- unreachable, or every node is down: nothing works then either way),
-- heartbeat ages stop growing. The first heartbeat after such a gap records
-- it as the quiet period [the newest heartbeat before it, now()], and ages
-- leave it out, so the nodes that were live when PostgreSQL went away are
-- not judged by the heartbeats they could not send meanwhile.
ALTER TABLE settings ADD COLUMN IF NOT EXISTS quiet_since timestamptz;
ALTER TABLE settings ADD COLUMN IF NOT EXISTS quiet_until timestamptz;

CREATE OR REPLACE FUNCTION heartbeat_age(hb timestamptz, quiet_s float8) RETURNS float8
LANGUAGE sql STABLE AS $fn$
    SELECT extract(epoch FROM
               least(now(), n.newest + make_interval(secs => quiet_s)) - hb
               - CASE WHEN hb <= s.quiet_since THEN s.quiet_until - s.quiet_since
                      ELSE interval '0' END)::float8
    FROM settings s,
         (SELECT max(last_heartbeat) AS newest FROM storage_nodes WHERE status = 'active') n
$fn$;

-- Database.sync: a commit that must reach the disk (and the synchronous
-- standby) needs a WAL record of its own; a transaction that only took a
-- transaction id commits without waiting. Each backend bumps its own row,
-- so syncs of different connections never wait on one another's lock.
CREATE TABLE IF NOT EXISTS sync_marks (
    pid integer PRIMARY KEY,
    n bigint NOT NULL
);

INSERT INTO schema_version (version) VALUES (6)
    ON CONFLICT (singleton) DO UPDATE SET version = greatest(schema_version.version, 6);

-- Version 7: inode numbers in blocks. A process reserves INODE_BLOCK (1024)
-- numbers with one nextval, made durable before it uses any (creates commit
-- asynchronously: a failover must not hand out again a number a mount
-- still holds).
ALTER SEQUENCE inode_seq INCREMENT BY 1024;

INSERT INTO schema_version (version) VALUES (7)
    ON CONFLICT (singleton) DO UPDATE SET version = greatest(schema_version.version, 7);

-- Version 8: commit marks. Database.transaction records each transaction's
-- id in its connection's row (conn: a random key per connection) as its
-- first statement; after a COMMIT whose answer was lost, the row tells
-- whether that transaction committed. Its id alone cannot: a standby
-- promoted before it had the transaction hands the same id out again.
-- Rows of connections gone for a day are deleted by the nodes' reclamation.
CREATE TABLE IF NOT EXISTS commit_marks (
    conn uuid PRIMARY KEY,
    xid bigint NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);

INSERT INTO schema_version (version) VALUES (8)
    ON CONFLICT (singleton) DO UPDATE SET version = greatest(schema_version.version, 8);
