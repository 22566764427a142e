#!/usr/bin/env bash
# Generate a self-signed ECDSA P-256 certificate for WebTransport hash pinning, with openssl.
#
# The openssl counterpart of `relay cert generate` and of the BAVY relay's script: writes
# cert.pem and key.pem (mode 0600) and prints the SHA-256 of the DER certificate, which the
# page passes as serverCertificateHashes (or the VM as --cert-hash).
#
# Browsers pin a certificate's hash only if it is X.509v3, ECDSA P-256 and valid for at most
# 14 days in total, so --days above 14 is refused. The certificate starts one hour in the past
# (clients whose clock is a little behind still accept it) and lasts exactly --days from then.
#
# Development and self-hosting only: for a public relay use a CA-issued certificate.

set -euo pipefail

readonly DEFAULT_SANS="DNS:localhost,IP:127.0.0.1,IP:::1,DNS:relay,IP:10.0.2.2"
readonly MAX_DAYS=14
readonly BACKDATE_SECONDS=3600

usage() {
    cat <<EOF
Usage: $(basename "$0") [--out DIR] [--days N] [--san NAME]...

Write a self-signed ECDSA P-256 certificate (cert.pem) and key (key.pem, mode 0600) into DIR
and print the SHA-256 hash browsers pin.

  --out DIR    output directory (default: ./certs)
  --days N     total validity in whole days, 1-${MAX_DAYS} (default: \$DAYS or ${MAX_DAYS})
  --san NAME   extra DNS name or IP address for the certificate (repeatable)
  -h, --help   show this help

The certificate always names ${DEFAULT_SANS//,/, }.
EOF
}

die() {
    echo "generate-certs: error: $*" >&2
    exit 2
}

# An ASN.1 UTCTime (YYMMDDHHMMSSZ) for a Unix time; GNU date first, then BSD date.
utc_time() {
    date -u -d "@$1" +%y%m%d%H%M%SZ 2>/dev/null || date -u -r "$1" +%y%m%d%H%M%SZ
}

human_time() {
    date -u -d "@$1" "+%Y-%m-%d %H:%M UTC" 2>/dev/null || date -u -r "$1" "+%Y-%m-%d %H:%M UTC"
}

# "IP:..." or "DNS:..." for one --san value; refuses anything openssl's config would misread.
san_entry() {
    local name=$1
    if [[ $name =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]]; then
        local octet octets
        IFS=. read -r -a octets <<<"$name"
        for octet in "${octets[@]}"; do
            ((10#$octet <= 255)) || die "--san $name: not a valid IPv4 address"
        done
        echo "IP:$name"
    elif [[ $name == *:* ]]; then
        [[ $name =~ ^[0-9A-Fa-f:.]+$ ]] || die "--san $name: not a valid IPv6 address"
        echo "IP:$name"
    elif [[ $name =~ ^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$ ]]; then
        echo "DNS:$name"
    else
        die "--san $name: not a DNS name or IP address"
    fi
}

out_dir=./certs
days=${DAYS:-$MAX_DAYS}
sans=$DEFAULT_SANS
entry=

while (($# > 0)); do
    case $1 in
        --out) (($# >= 2)) || die "--out needs a directory"; out_dir=$2; shift 2 ;;
        --out=*) out_dir=${1#--out=}; shift ;;
        --days) (($# >= 2)) || die "--days needs a number"; days=$2; shift 2 ;;
        --days=*) days=${1#--days=}; shift ;;
        --san) (($# >= 2)) || die "--san needs a name"; entry=$(san_entry "$2"); shift 2 ;;
        --san=*) entry=$(san_entry "${1#--san=}"); shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
    if [[ -n $entry && ,$sans, != *",$entry,"* ]]; then
        sans+=",$entry"
    fi
    entry=
done

if ! [[ $days =~ ^[0-9]+$ ]] || ((10#${days:0:9} < 1)); then
    die "--days must be a whole number of days, not '$days'"
fi
if ((${#days} > 9 || 10#$days > MAX_DAYS)); then
    die "a validity of $days days is too long: browsers refuse to pin" \
        "(serverCertificateHashes) a certificate valid for more than $MAX_DAYS days in total"
fi
days=$((10#$days))
[[ -n $out_dir ]] || die "--out needs a directory"
command -v openssl >/dev/null || die "openssl is not installed"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
caller_umask=$(umask)
umask 077

# openssl req -x509 cannot backdate notBefore (before OpenSSL 3.4), so sign the request with
# `openssl ca -selfsign`, which takes explicit start and end dates.
now=$(date -u +%s)
start=$((now - BACKDATE_SECONDS))
end=$((start + days * 86400))

openssl rand -hex 16 >"$work/serial"
: >"$work/index.txt"
cat >"$work/ca.cnf" <<EOF
[ ca ]
default_ca = selfsign

[ selfsign ]
database = $work/index.txt
new_certs_dir = $work
serial = $work/serial
default_md = sha256
policy = policy_any
unique_subject = no
email_in_dn = no

[ policy_any ]
commonName = supplied

[ leaf ]
subjectAltName = $sans
basicConstraints = critical,CA:FALSE
EOF

openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$work/key.pem" 2>"$work/log" \
    || { cat "$work/log" >&2; die "openssl could not generate the key"; }
openssl req -new -key "$work/key.pem" -subj /CN=relay -out "$work/csr.pem" 2>"$work/log" \
    || { cat "$work/log" >&2; die "openssl could not create the certificate request"; }
openssl ca -batch -notext -config "$work/ca.cnf" -selfsign -keyfile "$work/key.pem" \
    -in "$work/csr.pem" -out "$work/cert.pem" -extensions leaf \
    -startdate "$(utc_time "$start")" -enddate "$(utc_time "$end")" >"$work/log" 2>&1 \
    || { cat "$work/log" >&2; die "openssl could not sign the certificate"; }

hash_hex=$(openssl x509 -in "$work/cert.pem" -outform DER | openssl dgst -sha256 -r | cut -d' ' -f1)
hash_hex=$(tr 'A-F' 'a-f' <<<"$hash_hex")
[[ $hash_hex =~ ^[0-9a-f]{64}$ ]] || die "could not compute the certificate hash"
hash_colon=$(sed 's/../&:/g; s/:$//' <<<"$hash_hex")

(umask "$caller_umask" && mkdir -p "$out_dir")
chmod 644 "$work/cert.pem"
mv -f "$work/key.pem" "$out_dir/key.pem"
chmod 600 "$out_dir/key.pem"
mv -f "$work/cert.pem" "$out_dir/cert.pem"

echo "Certificate: $out_dir/cert.pem"
echo "Key: $out_dir/key.pem"
echo "Names: ${sans//,/, }"
echo "Valid from: $(human_time "$start")"
echo "Valid until: $(human_time "$end") (validity $days d; regenerate before then)"
echo "Certificate SHA-256 Hash: $hash_colon"
echo "Certificate SHA-256 Hash (hex): $hash_hex"
echo
echo "Run: relay serve --cert-pem $out_dir/cert.pem --key-pem $out_dir/key.pem"
