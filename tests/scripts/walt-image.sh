#!/usr/bin/env bash
# WalT's own image test flows (test/walt-image.sh, test/walt-help.sh and
# their includes in walt-python-packages), run as WalT runs them: `walt` from
# the PATH, one test after the other, each a plain shell function.
#
# Run by tests/e2e/walt_flows.rs, which starts the server and a registry and
# sets: PATH (walt first), WALT_CONFIG, HOME, TEST_IMAGE_URL (a clone URL of
# a busybox image labelled pc-x86-64, 2 layers), PUBLISH_REGISTRY (a
# registry label to publish to) and WORK (a scratch directory).
# Prints "ok: <test>" or "FAILED: <test>" per test; exits 1 if one failed.

set -u
: "${TEST_IMAGE_URL:?}" "${PUBLISH_REGISTRY:?}" "${WORK:?}"
# WalT's tests wait this long for an answer of the server (common.sh).
EXPECT_TIMEOUT_BLOCKING_INVOLVED=30
# The image name the clone gives (the last part of the URL, without tag).
CLONED_NAME=${TEST_IMAGE_URL##*/}
CLONED_NAME=${CLONED_NAME%%:*}

failed=()
define_test() {
    local name="$1" fn="$2" rc
    echo "=== $name"
    # Every command of a test counts (not run as an `if` condition, where
    # bash would ignore set -e), and every command of a pipeline.
    ( set -eo pipefail; "$fn" )
    rc=$?
    if [ $rc -eq 0 ]; then
        echo "ok: $name"
    else
        echo "FAILED: $name (status $rc)"
        failed+=("$name")
    fi
}

test_suite_image() {
    echo "${CLONED_NAME}-$$"
}

image_exists() {
    walt image show | grep "^$1 "
}

# --- walt-help.sh -------------------------------------------------------

t_help_list() {
    walt help list | grep '^image-build  *-- '
}

t_help_show_no_tty() {
    walt help show | grep -i walt
}

t_help_show_tty() {
    which expect
    expect <<EXP
set timeout 4
spawn walt help show
sleep 2
send "q\r"
expect {
    eof     { exit 0 }
    timeout { puts "timeout: 'walt help show' did not quit 4 seconds after 'q' was sent!"; exit 1 }
}
EXP
}

# --- walt-image.sh ------------------------------------------------------

t_show() {
    walt image show
}

t_search() {
    walt image search test-suite | grep "$TEST_IMAGE_URL"
}

t_clone() {
    walt image clone --force "$TEST_IMAGE_URL"
    image_exists "$CLONED_NAME"
}

t_rename() {
    walt image rename "$CLONED_NAME" "$(test_suite_image)"
    image_exists "$(test_suite_image)"
    ! image_exists "$CLONED_NAME"
}

t_duplicate() {
    walt image duplicate "$(test_suite_image)" "$(test_suite_image)-2"
    image_exists "$(test_suite_image)-2"
}

t_squash() {
    walt image squash "$(test_suite_image)-2" | tee "$WORK/squash.out"
    grep -x "Image $(test_suite_image)-2 squashed: 2 layers merged into 1." "$WORK/squash.out"
}

# test_walt_cp (includes/common.sh)
t_cp() {
    local target tempdir checkfile
    target="$(test_suite_image)"
    tempdir=$(mktemp -d -p "$WORK")
    checkfile=$(mktemp -u -p "$WORK")
    echo $$ > "$tempdir/testfile"
    walt image cp "$tempdir" "$target:/root/"
    walt image cp "$target:/root/$(basename "$tempdir")/testfile" "$checkfile"
    diff "$tempdir/testfile" "$checkfile"
    rm -rf "$tempdir" "$checkfile"
}

# test_walt_shell image (includes/common.sh)
t_shell() {
    local target checkfile out
    target="$(test_suite_image)"
    which expect
    expect <<EXP
set timeout $EXPECT_TIMEOUT_BLOCKING_INVOLVED
spawn walt image shell $target
# The prompt; busybox's ash (the test image's shell) follows it with a
# cursor position query (ESC [6n), which no terminal answers here.
expect {
    -re {# (\x1b\[6n)?\$}  { }
    timeout { puts "timeout: 'walt image shell' did not show the prompt!"; exit 1 }
}
send "echo ok > /root/test\r"
expect -re {# (\x1b\[6n)?\$}
send "exit\r"
expect {
    ": \$"  { }
    timeout { puts "timeout: no save prompt!"; exit 1 }
}
send "\r"
expect {
    "(y/n): \$" { }
    timeout { puts "timeout: no overwrite question!"; exit 1 }
}
send "y\r"
expect {
    "updated.\r" { }
    timeout { puts "timeout: the image was not updated!"; exit 1 }
}
expect eof
catch wait result
exit [lindex \$result 3]
EXP
    checkfile=$(mktemp -u -p "$WORK")
    walt image cp "$target:/root/test" "$checkfile"
    out=$(cat "$checkfile")
    rm -f "$checkfile"
    [ "$out" = "ok" ]
}

# test_walt_image_build (includes/image-build.sh), with a repository made
# here instead of WalT's pc-x86-64-test-suite-mod on GitHub.
make_build_repo() {
    local repo="$WORK/test-suite-mod"
    mkdir -p "$repo"
    cat > "$repo/Dockerfile" <<DF
FROM $(test_suite_image)
COPY check.sh /root/check.sh
RUN sh /root/check.sh > /root/test-result
DF
    cat > "$repo/check.sh" <<'SH'
# The image's files are there, and what walt image cp put in.
[ -x /bin/busybox ] && [ -d /root ] && echo OK || echo FAILED
SH
    git -C "$repo" -c init.defaultBranch=main init -q
    git -C "$repo" add -A
    git -C "$repo" -c user.name=walt-e2e -c user.email=e2e@walt.test commit -q -m test
    echo "file://$repo"
}

t_build() {
    local image_name_dir image_name_url url tmpdir res_dir res_url
    image_name_dir="$(test_suite_image)-3"
    image_name_url="$(test_suite_image)-4"
    url=$(make_build_repo)
    tmpdir=$(mktemp -d -p "$WORK")

    # build from dir
    git clone -q "$url" "$tmpdir/src"
    (cd "$tmpdir/src" && walt image build --from-dir . "$image_name_dir")

    # build from url
    walt image build --from-url "$url" --sub-dir / "$image_name_url"

    walt image cp "$image_name_dir:/root/test-result" "$tmpdir/test-result-dir"
    res_dir="$(cat "$tmpdir/test-result-dir")"
    walt image cp "$image_name_url:/root/test-result" "$tmpdir/test-result-url"
    res_url="$(cat "$tmpdir/test-result-url")"
    if [ "$res_dir" != "OK" ]; then
        echo "Failed: walt image build --from-dir" >&2
        return 1
    fi
    if [ "$res_url" != "OK" ]; then
        echo "Failed: walt image build --from-url" >&2
        return 1
    fi
    rm -rf "$tmpdir"
}

t_publish() {
    walt image clone --force "$TEST_IMAGE_URL"
    walt image publish --registry "$PUBLISH_REGISTRY" "$CLONED_NAME" | tee "$WORK/publish.out"
    url=$(sed -n 's/^Image .* published: //p' "$WORK/publish.out")
    [ -n "$url" ]
    walt image remove "$CLONED_NAME"
    # What was published can be found and cloned back.
    walt image search "$CLONED_NAME" | grep -F "$url"
    walt image clone "$url" "$CLONED_NAME-back"
    image_exists "$CLONED_NAME-back"
    walt image remove "$CLONED_NAME-back"
}

t_remove() {
    local image
    for image in $(walt image show | grep "$(test_suite_image)" | awk '{ print $1 }')
    do
        walt image remove "$image"
        image_exists "$image" && return 1
    done
    [ -z "$(walt image show --names-only | grep "$(test_suite_image)")" ]
}

define_test "walt help list" t_help_list
define_test "walt help show (no tty)" t_help_show_no_tty
define_test "walt help show (tty)" t_help_show_tty
define_test "walt image show" t_show
define_test "walt image search" t_search
define_test "walt image clone" t_clone
define_test "walt image rename" t_rename
define_test "walt image duplicate" t_duplicate
define_test "walt image squash" t_squash
define_test "walt image cp" t_cp
define_test "walt image shell" t_shell
define_test "walt image build" t_build
define_test "walt image publish" t_publish
define_test "walt image remove" t_remove

if [ ${#failed[@]} -ne 0 ]; then
    echo "failed: ${failed[*]}"
    exit 1
fi
echo "all tests passed"
