#!/usr/bin/env bash
# Builds the HAPI FHIR JPA server of scripts/hapi/ into a build directory (default
# $STACK_DIR/hapi): BUILD_DIR/app.jar and BUILD_DIR/lib/*.jar. Idempotent: the Maven build
# is skipped when BUILD_DIR/build.stamp matches the checksum of pom.xml and src/.
# With --cds (default on) an AppCDS archive BUILD_DIR/app.jsa is made as well (one extra
# start of the server, about half a minute), which makes every later start faster.
#
# Usage: scripts/hapi/build.sh [--build-dir DIR] [--force] [--no-cds]
#   --build-dir DIR   where the jars go (default $STACK_DIR/hapi)
#   --force           build even when the stamp matches
#   --no-cds          do not make the AppCDS archive
# Prints the build directory on stdout.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"

usage() { print_usage "${BASH_SOURCE[0]}"; exit 64; }

hapi_src=$SCRIPTS_DIR/hapi
build_dir=$STACK_DIR/hapi force=false cds=true
while (($# > 0)); do
  case $1 in
    --build-dir) build_dir=${2:?}; shift 2 ;;
    --force) force=true; shift ;;
    --no-cds) cds=false; shift ;;
    -h | --help) usage ;;
    *) log "unknown argument: $1"; usage ;;
  esac
done
command -v java >/dev/null || die "java not found on PATH (Java 17+ needed)"
command -v mvn >/dev/null || die "mvn not found on PATH (Maven 3.8+ needed)"

mkdir -p "$build_dir"
build_dir=$(cd "$build_dir" && pwd)
# Checksum of everything that goes into the build, and of the java version (the CDS archive
# is only valid for the JVM that made it).
sum=$( (cd "$hapi_src" && find pom.xml src -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
  java -version 2>&1) | sha256sum | cut -d' ' -f1)
stamp=$build_dir/build.stamp
want=$sum
$cds && want="$sum cds"

if ! $force && [[ -f $stamp && $(<"$stamp") == "$want" && -f $build_dir/app.jar ]]; then
  log "HAPI server up to date in $build_dir"
  echo "$build_dir"
  exit 0
fi

rm -f "$stamp" "$build_dir/app.jsa"
log "building the HAPI FHIR server into $build_dir (first time: downloads ~300 MB from Maven Central)"
rm -rf "$build_dir/lib"
mvn -q -B -Dstyle.color=never -f "$hapi_src/pom.xml" -DbuildDirectory="$build_dir" package >&2 \
  || die "Maven build of $hapi_src failed"
[[ -f $build_dir/app.jar && -d $build_dir/lib ]] || die "Maven build left no $build_dir/app.jar"

if $cds; then
  # AppCDS: start the server once, let it answer a search, stop it; the JVM dumps the loaded
  # classes into app.jsa on exit (-XX:ArchiveClassesAtExit). Later starts map them from there.
  log "making the AppCDS archive (one trial start of the server)"
  tmp=$(mktemp -d)
  port=$(free_port)
  java -XX:ArchiveClassesAtExit="$build_dir/app.jsa" -Xmx768m -XX:TieredStopAtLevel=1 -XX:+UseSerialGC \
    -cp "$build_dir/lib/*:$build_dir/app.jar" org.smartfhirproxy.hapi.Main --port "$port" \
    --access-log "$tmp/access.log" >"$tmp/out" 2>"$tmp/err" </dev/null &
  pid=$!
  # However this script ends, the trial server does not outlive it.
  trap 'stop_pid "$pid" 5; rm -rf "$tmp"' EXIT
  ok=false
  if "$SCRIPTS_DIR/lib/wait-http.sh" "http://127.0.0.1:$port/fhir/metadata" 180 "$pid"; then
    # Exercise the common paths so their classes are archived too.
    base=http://127.0.0.1:$port/fhir
    curl -fsS -o /dev/null -X PUT -H 'Content-Type: application/fhir+json' \
      -d '{"resourceType":"Patient","id":"cds1","name":[{"family":"Cds","given":["Amy"]}],"birthDate":"1970-01-01"}' \
      "$base/Patient/cds1" || true
    curl -fsS -o /dev/null "$base/Patient?family=Cds&_count=1&_include=Patient:general-practitioner" || true
    curl -fsS -o /dev/null "$base/Patient/cds1/Patient" || true
    curl -fsS -o /dev/null -X POST -H 'Content-Type: application/fhir+json' \
      -d '{"resourceType":"Parameters","parameter":[{"name":"resource","resource":{"resourceType":"Patient","name":[{"family":"Cds","given":["Amy"]}],"birthDate":"1970-01-01"}}]}' \
      "$base/Patient/\$match" || true
    ok=true
  fi
  stop_pid "$pid" 30
  wait "$pid" 2>/dev/null || true
  if $ok && [[ -s $build_dir/app.jsa ]]; then
    log "AppCDS archive $build_dir/app.jsa ($(du -h "$build_dir/app.jsa" | cut -f1))"
  else
    log "warning: no AppCDS archive made (starts will be slower); see $tmp/err"
    rm -f "$build_dir/app.jsa"
    want=$sum
  fi
  rm -rf "$tmp"
  trap - EXIT
fi

echo "$want" >"$stamp"
echo "$build_dir"
