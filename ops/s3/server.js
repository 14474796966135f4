// The local stack's object store: s3rver (objects are plain files under --directory), with
// durable writes. s3rver writes an object in place and answers before the file is flushed;
// here an object goes to a temporary file that is fsynced and renamed over the old one after
// its metadata, so a crash (kill -9) leaves either the previous object or the new one, and an
// answered PUT is on disk. Keys that would resolve outside their bucket's folder are refused.
//
//   node --openssl-legacy-provider server.js --directory DIR --port N --bucket NAME --access-key-id ID
//
// (s3rver's ListObjectsV2 continuation tokens use DES, which OpenSSL 3 keeps in its legacy provider.)
'use strict';

const crypto = require('crypto');
const path = require('path');
const { Transform, pipeline } = require('stream');
const fs = require('fs-extra');
const S3rver = require('s3rver');
const AWSAccount = require('s3rver/lib/models/account');
const FilesystemStore = require('s3rver/lib/stores/filesystem');
const S3Error = require('s3rver/lib/models/error');
const S3Object = require('s3rver/lib/models/object');

const OBJECT_SUFFIX = '._S3rver_object';  // s3rver's file name for an object's bytes

function parseArgs(argv) {
  const args = {};
  for (let i = 0; i < argv.length; i += 2) {
    if (!argv[i].startsWith('--') || argv[i + 1] === undefined) throw new Error(`bad argument ${argv[i]}`);
    args[argv[i].slice(2)] = argv[i + 1];
  }
  for (const name of ['directory', 'port', 'bucket', 'access-key-id']) {
    if (!args[name]) throw new Error(`--${name} is required`);
  }
  return args;
}

// A key is a file path below its bucket's folder: a `.` or `..` segment would name another key's
// file, another bucket's or one outside the store, so such keys are refused, and whatever a key
// resolves to must stay inside its bucket's folder.
const resourcePath = FilesystemStore.prototype.getResourcePath;
FilesystemStore.prototype.getResourcePath = function (bucket, key, resource) {
  const segments = String(key || '').split(/[\\/]/);
  if (segments.includes('..') || segments.includes('.')) {
    throw new S3Error('InvalidArgument', `key ${key} has a '.' or '..' segment`);
  }
  const resolved = resourcePath.call(this, bucket, key, resource);
  const root = path.resolve(this.rootDirectory) + path.sep;
  const bucketRoot = path.resolve(this.rootDirectory, bucket) + path.sep;
  if (!bucketRoot.startsWith(root) || !path.resolve(resolved).startsWith(bucketRoot)) {
    throw new S3Error('InvalidArgument', `key ${key} resolves outside its bucket`);
  }
  return resolved;
};

// s3rver's listing skips a folder whose path below the prefix has a delimiter before it has seen
// an object in it (so `a/` lists no `a/a/` for a key a/a/b/c) and walks folders unsorted; this one
// walks every folder that can hold a key under the prefix and lists the keys in order.
function* objectPaths(dir) {
  for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
    const full = path.posix.join(dir, entry.name);
    if (entry.isDirectory()) yield* objectPaths(full);
    else if (entry.name.endsWith(OBJECT_SUFFIX)) yield full;
  }
}

FilesystemStore.prototype.listObjects = async function (bucket, options) {
  const { delimiter = '', startAfter = '', prefix = '', maxKeys = Infinity } = options;
  const bucketPath = this.getBucketPath(bucket);
  // The deepest folder that holds every key under the prefix.
  const start = path.posix.join(bucketPath, prefix.split('/').slice(0, -1).join('/'));
  const allKeys = [];
  if (fs.existsSync(start)) {
    for (const file of objectPaths(start)) {
      const key = file.slice(bucketPath.length + 1, -OBJECT_SUFFIX.length);
      if (key > startAfter && key.startsWith(prefix)) allKeys.push(key);
    }
  }
  allKeys.sort();
  const commonPrefixes = new Set();
  const keys = [];
  let isTruncated = false;
  for (const key of allKeys) {
    const idx = delimiter ? key.slice(prefix.length).indexOf(delimiter) : -1;
    if (idx !== -1) {
      commonPrefixes.add(key.slice(0, prefix.length + idx + delimiter.length));
    } else if (keys.length < maxKeys) {
      keys.push(key);
    } else {
      isTruncated = true;
      break;
    }
  }
  const metadata = await Promise.all(
    keys.map(key => this.getMetadata(bucket, key).catch(err => (err.code === 'ENOENT' ? undefined : Promise.reject(err)))),
  );
  return {
    objects: keys
      .map((key, i) => [key, metadata[i]])
      .filter(([, meta]) => meta !== undefined)
      .map(([key, meta]) => new S3Object(bucket, key, null, meta)),
    commonPrefixes: [...commonPrefixes].sort(),
    isTruncated,
  };
};

async function fsyncFile(file) {
  const fd = await fs.open(file, 'r');
  try {
    await fs.fsync(fd);
  } finally {
    await fs.close(fd);
  }
}

FilesystemStore.prototype.putObject = async function (object) {
  const objectPath = this.getResourcePath(object.bucket, object.key, 'object');
  await fs.mkdirp(path.dirname(objectPath));
  const tmp = `${objectPath}.${crypto.randomBytes(6).toString('hex')}.partial`;
  const md5Context = crypto.createHash('md5');
  let size = 0;
  const source = Buffer.isBuffer(object.content)
    ? require('stream').Readable.from([object.content])
    : object.content;
  const hash = new Transform({
    transform(chunk, encoding, callback) {
      md5Context.update(chunk);
      size += chunk.length;
      callback(null, chunk);
    },
  });
  try {
    await new Promise((resolve, reject) =>
      pipeline(source, hash, fs.createWriteStream(tmp), err => (err ? reject(err) : resolve())),
    );
    await fsyncFile(tmp);
    const md5 = md5Context.digest('hex');
    await this.putMetadata(object.bucket, object.key, object.metadata, md5);
    await fs.rename(tmp, objectPath);
    return { size, md5 };
  } catch (err) {
    await fs.remove(tmp).catch(() => {});
    throw err;
  }
};

// Temporary files of writes that a crash interrupted: never answered, so never visible.
async function removePartials(dir) {
  for (const entry of await fs.readdir(dir, { withFileTypes: true })) {
    const full = path.join(dir, entry.name);
    if (entry.isDirectory()) await removePartials(full);
    else if (entry.name.endsWith('.partial')) await fs.remove(full);
  }
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  // s3rver checks the access key id only (SigV4 signatures are not verified): the store binds
  // loopback, and the key pair is the stack's placeholder.
  AWSAccount.DUMMY_ACCOUNT.revokeAccessKey('S3RVER');
  AWSAccount.DUMMY_ACCOUNT.createKeyPair(args['access-key-id'], 'unused');
  const directory = path.resolve(args.directory);
  await fs.mkdirp(path.join(directory, args.bucket));  // a bucket is a folder: created once, kept
  await removePartials(directory);
  const server = new S3rver({
    directory,
    address: '127.0.0.1',
    port: Number(args.port),
    silent: true,
    vhostBuckets: false,
  });
  server.on('error', err => console.error(`s3rver: ${err.code || ''} ${err.message}`));
  await server.run();
  const { httpServer } = server;
  httpServer.headersTimeout = 30000;
  httpServer.requestTimeout = 600000;  // a 64 MiB part on a slow disk
  console.log(`s3rver: serving ${directory} on 127.0.0.1:${args.port}`);
  const stop = () => httpServer.close(() => process.exit(0));
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main().catch(err => {
  console.error(`s3rver: ${err.message}`);
  process.exit(1);
});
