/* The data plane's per-packet kernel: tund's batch loops in C against
 * OpenSSL libcrypto (common/native.py loads it; MYCELIUM_NATIVE=0 runs the
 * Python reference instead).
 *
 * Each function here mirrors one Python reference step by step, so that
 * the same batch gives the same bytes out and the same counted drops:
 *
 *   Aead            common/crypto.py SessionKey's AESGCM (one context per
 *                   direction, keyed once; per packet only the IV is set)
 *   Gro             services/tund/gro.py Gro
 *   split_tcp       services/tund/gso.py split_tcp
 *   from_tun        services/tund/dataplane.py DataPlane.from_tun / _from_tun_gso
 *   from_peer       services/tund/dataplane.py DataPlane.from_peer
 *
 * The fast path of every packet runs here; anything the reference handles
 * on a slow path (route-cache miss, ICMP, queueing, unknown key, messages,
 * the FIB source check) calls the DataPlane's own Python method for it.
 * Nothing read from the TUN or the wire is trusted: every offset is checked
 * against the buffer before it is read.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/provider.h>
#include <openssl/rand.h>
#if !defined(OPENSSL_VERSION_MAJOR) || OPENSSL_VERSION_MAJOR < 3
#error "the data-plane kernel needs OpenSSL 3 (libssl-dev 3.x); without it the services run the Python reference"
#endif
#include <stdarg.h>
#include <stdint.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <errno.h>
#include <unistd.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <limits.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

#define NONCE 12
#define TAG 16
#define DATA_HDR 40      /* outer header 8 + source 16 + destination 16 */
#define MIN_SEALED (NONCE + TAG + 4)
#define VNET_HDR 10
#define MAX_PAYLOAD 65535
#define GRO_MAX_OPEN 256 /* as gro.py MAX_OPEN */
#define TCP_FIN 0x01
#define TCP_PSH 0x08
#define TCP_ACK 0x10
#define TCP_CWR 0x80

static PyObject *InvalidTag; /* cryptography.exceptions.InvalidTag, from configure() */
static PyObject *Four;       /* the offset of an IPv6 packet in a plaintext */
static PyObject *FloatZero;  /* 0.0 */
static PyObject *Urandom;    /* os.urandom: nonces then come from getrandom (fill_random) */

/* attribute and method names the kernel looks up, interned once at import:
 * a lookup by C string builds and interns the name first, which after an
 * idle spell costs more than the lookup itself (a fifth of a cold from_tun) */
#define KERNEL_NAMES(X)                                                                                                \
    X(advance) X(by_index) X(capable) X(counters) X(fail) X(fd) X(filter_nonces) X(firewall) X(generation)             \
    X(gro) X(head) X(keep) X(keys_in) X(map) X(messages) X(mtu) X(name_bytes) X(native) X(nonce_bytes)                 \
    X(nonce_filter) X(now) X(off) X(order) X(out) X(release) X(ring) X(routes) X(seen) X(sessions) X(size)             \
    X(tail) X(tun) X(tx_bytes) X(vnet) X(write_fd) X(_undo) X(full_since) X(changed) X(outbox)                         \
    X(sync_sessions) X(need) X(drain_after) X(ctr) X(remote_index) X(used) X(prefix) X(window) X(aead)                 \
    X(confirmed) X(fresh) X(mark) X(decrypt) X(confirm) X(_undecryptable) X(_static_refused) X(_session_in)            \
    X(append) X(popleft) X(_route_for_tun) X(_tun_exception) X(from_tun) X(_key_for_src) X(_queue_in)                  \
    X(_same_owner) X(_oob_in) X(add)
#define DECLARE_NAME(n) static PyObject *N_##n;
KERNEL_NAMES(DECLARE_NAME)

/* --- state the kernel reads on every call, in C slots ------------------------
 *
 * DataPlane, DataOut, RingWriter/RingReader and peerd's SendQueue derive
 * from these bases when the kernel is built (their Python code unchanged:
 * each field is an ordinary attribute to it). The kernel then reads a field
 * from its slot instead of looking it up by name, which after an idle
 * spell costs a few cache lines per lookup: a fifth of a cold from_peer and
 * of a cold hand-over. field()/set_field() fall back to the attribute for
 * any other object. */
typedef struct {
    PyObject_HEAD PyObject *f[1]; /* as many as the type's fields */
} Fields;

#define PLANE_FIELDS(X)                                                                                                \
    X(now) X(routes) X(out) X(counters) X(nonce_bytes) X(off) X(vnet) X(mtu) X(keys_in) X(gro) X(tun) X(messages)     \
        X(sessions) X(by_index) X(capable) X(filter_nonces) X(nonce_filter) X(firewall)
#define RING_FIELDS(X) X(size) X(head) X(tail) X(generation) X(map) X(_undo) X(full_since)
#define OUT_FIELDS(X) X(fd) X(ring) X(name_bytes)
#define QUEUE_FIELDS(X) X(write_fd) X(tx_bytes)
#define PLANE_INDEX(n) PF_##n,
#define RING_INDEX(n) RF_##n,
#define OUT_INDEX(n) OF_##n,
#define QUEUE_INDEX(n) QF_##n,
enum { PLANE_FIELDS(PLANE_INDEX) PLANE_N };
enum { RING_FIELDS(RING_INDEX) RING_N };
enum { OUT_FIELDS(OUT_INDEX) OUT_N };
enum { QUEUE_FIELDS(QUEUE_INDEX) QUEUE_N };
#define PLANE_MEMBER(n) {#n, T_OBJECT_EX, offsetof(Fields, f) + PF_##n * sizeof(PyObject *), 0, NULL},
#define RING_MEMBER(n) {#n, T_OBJECT_EX, offsetof(Fields, f) + RF_##n * sizeof(PyObject *), 0, NULL},
#define OUT_MEMBER(n) {#n, T_OBJECT_EX, offsetof(Fields, f) + OF_##n * sizeof(PyObject *), 0, NULL},
#define QUEUE_MEMBER(n) {#n, T_OBJECT_EX, offsetof(Fields, f) + QF_##n * sizeof(PyObject *), 0, NULL},

#define FIELDS_TYPE(NAME, PYNAME, N, LIST, MEMBER, DOC)                                                                       \
    static int NAME##_traverse(PyObject *self, visitproc visit, void *arg) {                                           \
        for (int i = 0; i < N; i++)                                                                                    \
            Py_VISIT(((Fields *)self)->f[i]);                                                                          \
        return 0;                                                                                                      \
    }                                                                                                                  \
    static int NAME##_clear(PyObject *self) {                                                                          \
        for (int i = 0; i < N; i++)                                                                                    \
            Py_CLEAR(((Fields *)self)->f[i]);                                                                          \
        return 0;                                                                                                      \
    }                                                                                                                  \
    static void NAME##_dealloc(PyObject *self) {                                                                       \
        PyObject_GC_UnTrack(self);                                                                                     \
        NAME##_clear(self);                                                                                            \
        Py_TYPE(self)->tp_free(self);                                                                                  \
    }                                                                                                                  \
    static PyMemberDef NAME##_members[] = {LIST(MEMBER){NULL}};                                                  \
    static PyTypeObject NAME##Type = {                                                                                 \
        PyVarObject_HEAD_INIT(NULL, 0).tp_name = "_kernel." PYNAME,                                                    \
        .tp_basicsize = sizeof(PyObject) + N * sizeof(PyObject *),                                                     \
        .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,                                     \
        .tp_doc = DOC,                                                                                                 \
        .tp_new = PyType_GenericNew,                                                                                   \
        .tp_traverse = NAME##_traverse,                                                                                \
        .tp_clear = NAME##_clear,                                                                                      \
        .tp_dealloc = NAME##_dealloc,                                                                                  \
        .tp_members = NAME##_members,                                                                                  \
    };

FIELDS_TYPE(Plane, "PlaneFields", PLANE_N, PLANE_FIELDS, PLANE_MEMBER, "DataPlane's fields the kernel reads, in slots")
FIELDS_TYPE(Ring, "RingFields", RING_N, RING_FIELDS, RING_MEMBER, "a ring's size, head, tail, generation and map, in slots")
FIELDS_TYPE(Out, "OutFields", OUT_N, OUT_FIELDS, OUT_MEMBER, "DataOut's descriptor, ring and name, in slots")
FIELDS_TYPE(Queue, "QueueFields", QUEUE_N, QUEUE_FIELDS, QUEUE_MEMBER, "SendQueue's write_fd and tx_bytes, in slots")

/* A tuple of n new references, stolen (NULL when one of them is: an
 * exception is set). Why not Py_BuildValue: it parses its format string,
 * one more stretch of cold code at the end of every wake-up's call. */
static PyObject *tuple_steal(int n, ...) {
    va_list ap;
    va_start(ap, n);
    PyObject *items[8];
    int bad = n > 8;
    for (int i = 0; i < n && i < 8; i++) {
        items[i] = va_arg(ap, PyObject *);
        bad |= items[i] == NULL;
    }
    va_end(ap);
    PyObject *t = bad ? NULL : PyTuple_New(n);
    for (int i = 0; i < n && i < 8; i++) {
        if (t)
            PyTuple_SET_ITEM(t, i, items[i]);
        else
            Py_XDECREF(items[i]);
    }
    return t;
}

/* obj's field idx (a new reference) from its slot when obj has the base
 * type, else the attribute ``name``; AttributeError when unset */
static PyObject *field(PyObject *obj, PyTypeObject *type, int idx, PyObject *name) {
    if (PyObject_TypeCheck(obj, type)) {
        PyObject *v = ((Fields *)obj)->f[idx];
        if (v)
            return Py_NewRef(v);
        PyErr_SetObject(PyExc_AttributeError, name);
        return NULL;
    }
    return PyObject_GetAttr(obj, name);
}

static int set_field(PyObject *obj, PyTypeObject *type, int idx, PyObject *name, PyObject *v) {
    if (PyObject_TypeCheck(obj, type)) {
        Py_XSETREF(((Fields *)obj)->f[idx], Py_NewRef(v));
        return 0;
    }
    return PyObject_SetAttr(obj, name, v);
}

#define PLANE(o, n) field((o), &PlaneType, PF_##n, N_##n)
#define RING(o, n) field((o), &RingType, RF_##n, N_##n)
#define OUT(o, n) field((o), &OutType, OF_##n, N_##n)
#define QUEUE(o, n) field((o), &QueueType, QF_##n, N_##n)

/* --- one's complement sums ------------------------------------------------ */

/* A value congruent mod 0xFFFF to the sum of the big-endian 16-bit words of
 * p[0:n] (an odd last byte padded with zero). 2^16 = 1 mod 0xFFFF, so wide
 * native-order loads can be summed and the byte order fixed at the end
 * (a byte swap of a 16-bit value is a multiplication by 256 mod 0xFFFF). */
static uint64_t sum_be(const uint8_t *p, size_t n) {
    uint64_t acc = 0;
    size_t i = 0;
    if (n >= 8) {
        uint64_t a0 = 0, a1 = 0;
#ifdef __SSE2__
        if (n >= 64) { /* the same 32-bit words, four lanes at a time: half the time of the loop below */
            __m128i z = _mm_setzero_si128(), s0 = z, s1 = z;
            for (; i + 32 <= n; i += 32) {
                __m128i v0 = _mm_loadu_si128((const __m128i *)(p + i));
                __m128i v1 = _mm_loadu_si128((const __m128i *)(p + i + 16));
                s0 = _mm_add_epi64(s0, _mm_add_epi64(_mm_unpacklo_epi32(v0, z), _mm_unpackhi_epi32(v0, z)));
                s1 = _mm_add_epi64(s1, _mm_add_epi64(_mm_unpacklo_epi32(v1, z), _mm_unpackhi_epi32(v1, z)));
            }
            uint64_t lane[4];
            _mm_storeu_si128((__m128i *)lane, s0);
            _mm_storeu_si128((__m128i *)(lane + 2), s1);
            a0 = lane[0] % 0xFFFF + lane[1] % 0xFFFF;
            a1 = lane[2] % 0xFFFF + lane[3] % 0xFFFF;
        }
#endif
        for (; i + 16 <= n; i += 16) {
            uint64_t w0, w1;
            memcpy(&w0, p + i, 8);
            memcpy(&w1, p + i + 8, 8);
            a0 += (w0 & 0xFFFFFFFFu) + (w0 >> 32);
            a1 += (w1 & 0xFFFFFFFFu) + (w1 >> 32);
        }
        for (; i + 8 <= n; i += 8) {
            uint64_t w;
            memcpy(&w, p + i, 8);
            a0 += (w & 0xFFFFFFFFu) + (w >> 32);
        }
        acc = (a0 % 0xFFFF + a1 % 0xFFFF) % 0xFFFF;
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        acc = (acc * 256) % 0xFFFF;
#endif
    }
    for (; i + 2 <= n; i += 2)
        acc += (uint64_t)p[i] << 8 | p[i + 1];
    if (i < n)
        acc += (uint64_t)p[i] << 8;
    return acc;
}

static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline uint32_t rd32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline void wr16(uint8_t *p, unsigned v) {
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}
static inline void wr32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}
/* -x % 0xFFFF as Python computes it (0..0xFFFE) */
static inline unsigned neg_mod(uint64_t x) { return (unsigned)((0xFFFF - x % 0xFFFF) % 0xFFFF); }

/* --- Aead ------------------------------------------------------------------ */

/* AES-256-GCM through the provider's own cipher functions (provider-cipher(7)),
 * found once in the provider that EVP_CIPHER_fetch picks. OpenSSL 3.0's EVP
 * layer looks up parameters by name on every call: setting the IV asks for
 * the IV length and fetching or setting the tag goes through a ctrl, about a
 * sixth of a 1400-byte seal. The provider's functions take the IV length as
 * an argument. EVP stays as the fallback where the provider lacks one of the
 * functions or fails the known-answer check in gcm_setup. */
typedef struct {
    void *provctx;
    OSSL_FUNC_cipher_newctx_fn *newctx;
    OSSL_FUNC_cipher_freectx_fn *freectx;
    OSSL_FUNC_cipher_encrypt_init_fn *einit;
    OSSL_FUNC_cipher_decrypt_init_fn *dinit;
    OSSL_FUNC_cipher_update_fn *update;
    OSSL_FUNC_cipher_final_fn *final;
    OSSL_FUNC_cipher_get_ctx_params_fn *get_params;
    OSSL_FUNC_cipher_set_ctx_params_fn *set_params;
} GcmFuncs;

static GcmFuncs gcm;           /* gcm.newctx == NULL: EVP only */
static EVP_CIPHER *gcm_cipher; /* holds the provider while gcm is in use */

typedef struct {
    PyObject_HEAD EVP_CIPHER_CTX *enc; /* the EVP contexts, or NULL with penc/pdec */
    EVP_CIPHER_CTX *dec;
    void *penc; /* the provider's contexts */
    void *pdec;
} Aead;

static PyTypeObject AeadType;

/* ciphertext || tag of aad (associated data) and the plaintext a[0:an] || b[0:bn] into out */
static int gcm_seal(Aead *k, const uint8_t *iv, const uint8_t *aad, size_t aadn, const uint8_t *a, size_t an,
                    const uint8_t *b, size_t bn, uint8_t *out) {
    if (k->penc) {
        size_t len;
        OSSL_PARAM tag[2] = {OSSL_PARAM_construct_octet_string(OSSL_CIPHER_PARAM_AEAD_TAG, out + an + bn, TAG),
                             OSSL_PARAM_construct_end()};
        return gcm.einit(k->penc, NULL, 0, iv, NONCE, NULL) == 1 &&
                       (!aadn || gcm.update(k->penc, NULL, &len, aadn, aad, aadn) == 1) &&
                       (!an || gcm.update(k->penc, out, &len, an, a, an) == 1) &&
                       (!bn || gcm.update(k->penc, out + an, &len, bn, b, bn) == 1) &&
                       gcm.final(k->penc, out + an + bn, &len, 0) == 1 && gcm.get_params(k->penc, tag) == 1
                   ? 0
                   : -1;
    }
    int len;
    EVP_CIPHER_CTX *c = k->enc;
    return EVP_EncryptInit_ex(c, NULL, NULL, NULL, iv) == 1 &&
                   (!aadn || EVP_EncryptUpdate(c, NULL, &len, aad, (int)aadn) == 1) &&
                   (!an || EVP_EncryptUpdate(c, out, &len, a, (int)an) == 1) &&
                   (!bn || EVP_EncryptUpdate(c, out + an, &len, b, (int)bn) == 1) &&
                   EVP_EncryptFinal_ex(c, out + an + bn, &len) == 1 &&
                   EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, TAG, out + an + bn) == 1
               ? 0
               : -1;
}

/* 0: authentic, plaintext of ct[0:n] in out; 1: authentication failed */
static int gcm_open(Aead *k, const uint8_t *iv, const uint8_t *aad, size_t aadn, const uint8_t *ct, size_t n,
                    const uint8_t *tag, uint8_t *out) {
    if (k->pdec) {
        size_t len;
        OSSL_PARAM p[2] = {OSSL_PARAM_construct_octet_string(OSSL_CIPHER_PARAM_AEAD_TAG, (void *)tag, TAG),
                           OSSL_PARAM_construct_end()};
        return gcm.dinit(k->pdec, NULL, 0, iv, NONCE, NULL) == 1 &&
                       (!aadn || gcm.update(k->pdec, NULL, &len, aadn, aad, aadn) == 1) &&
                       (!n || gcm.update(k->pdec, out, &len, n, ct, n) == 1) && gcm.set_params(k->pdec, p) == 1 &&
                       gcm.final(k->pdec, out + n, &len, 0) == 1
                   ? 0
                   : 1;
    }
    int len;
    EVP_CIPHER_CTX *c = k->dec;
    return EVP_DecryptInit_ex(c, NULL, NULL, NULL, iv) == 1 &&
                   (!aadn || EVP_DecryptUpdate(c, NULL, &len, aad, (int)aadn) == 1) &&
                   (!n || EVP_DecryptUpdate(c, out, &len, ct, (int)n) == 1) &&
                   EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG, TAG, (void *)tag) == 1 &&
                   EVP_DecryptFinal_ex(c, out + n, &len) > 0
               ? 0
               : 1;
}

static void aead_free_contexts(Aead *self) {
    EVP_CIPHER_CTX_free(self->enc);
    EVP_CIPHER_CTX_free(self->dec);
    if (self->penc)
        gcm.freectx(self->penc);
    if (self->pdec)
        gcm.freectx(self->pdec);
    self->enc = self->dec = NULL;
    self->penc = self->pdec = NULL;
}

/* keyed contexts for key[0:32], by the provider's functions unless evp */
static int aead_key(Aead *self, const uint8_t *key, int evp) {
    aead_free_contexts(self);
    if (gcm.newctx && !evp) {
        self->penc = gcm.newctx(gcm.provctx);
        self->pdec = gcm.newctx(gcm.provctx);
        return self->penc && self->pdec && gcm.einit(self->penc, key, 32, NULL, 0, NULL) == 1 &&
                       gcm.dinit(self->pdec, key, 32, NULL, 0, NULL) == 1
                   ? 0
                   : -1;
    }
    self->enc = EVP_CIPHER_CTX_new();
    self->dec = EVP_CIPHER_CTX_new();
    return self->enc && self->dec && EVP_EncryptInit_ex(self->enc, EVP_aes_256_gcm(), NULL, key, NULL) == 1 &&
                   EVP_DecryptInit_ex(self->dec, EVP_aes_256_gcm(), NULL, key, NULL) == 1
               ? 0
               : -1;
}

static int has_name(const char *names, const char *want) { /* names: "A:B:C" */
    size_t n = strlen(want);
    for (const char *p = names; p; p = strchr(p, ':'), p = p ? p + 1 : NULL)
        if (strncasecmp(p, want, n) == 0 && (p[n] == ':' || p[n] == '\0'))
            return 1;
    return 0;
}

/* The provider's AES-256-GCM functions into gcm, kept only if they give
 * EVP's bytes for a test vector (and refuse a bad tag) */
static void gcm_setup(void) {
    EVP_CIPHER *cipher = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
    const OSSL_PROVIDER *prov = cipher ? EVP_CIPHER_get0_provider(cipher) : NULL;
    int no_cache = 0;
    const OSSL_ALGORITHM *algs = prov ? OSSL_PROVIDER_query_operation(prov, OSSL_OP_CIPHER, &no_cache) : NULL;
    GcmFuncs f = {0};
    for (const OSSL_ALGORITHM *a = algs; a && a->algorithm_names; a++) {
        if (!has_name(a->algorithm_names, "AES-256-GCM"))
            continue;
        for (const OSSL_DISPATCH *d = a->implementation; d->function_id; d++)
            switch (d->function_id) {
            case OSSL_FUNC_CIPHER_NEWCTX: f.newctx = OSSL_FUNC_cipher_newctx(d); break;
            case OSSL_FUNC_CIPHER_FREECTX: f.freectx = OSSL_FUNC_cipher_freectx(d); break;
            case OSSL_FUNC_CIPHER_ENCRYPT_INIT: f.einit = OSSL_FUNC_cipher_encrypt_init(d); break;
            case OSSL_FUNC_CIPHER_DECRYPT_INIT: f.dinit = OSSL_FUNC_cipher_decrypt_init(d); break;
            case OSSL_FUNC_CIPHER_UPDATE: f.update = OSSL_FUNC_cipher_update(d); break;
            case OSSL_FUNC_CIPHER_FINAL: f.final = OSSL_FUNC_cipher_final(d); break;
            case OSSL_FUNC_CIPHER_GET_CTX_PARAMS: f.get_params = OSSL_FUNC_cipher_get_ctx_params(d); break;
            case OSSL_FUNC_CIPHER_SET_CTX_PARAMS: f.set_params = OSSL_FUNC_cipher_set_ctx_params(d); break;
            }
        break;
    }
    if (algs)
        OSSL_PROVIDER_unquery_operation(prov, OSSL_OP_CIPHER, algs);
    f.provctx = prov ? OSSL_PROVIDER_get0_provider_ctx(prov) : NULL;
    int ok = f.newctx && f.freectx && f.einit && f.dinit && f.update && f.final && f.get_params && f.set_params;
    if (ok) { /* a known answer: both ways, the same bytes; a bad tag refused */
        uint8_t key[32], iv[NONCE], aad[20], pt[100], ct1[100 + TAG], ct2[100 + TAG], back[100];
        for (int i = 0; i < 100; i++)
            pt[i] = (uint8_t)(i * 7 + 1);
        memcpy(key, pt, 32);
        memcpy(iv, pt + 40, NONCE);
        memcpy(aad, pt + 60, 20);
        Aead viaevp = {0}, viaprov = {0};
        gcm = f;
        ok = aead_key(&viaevp, key, 1) == 0 && aead_key(&viaprov, key, 0) == 0 &&
             gcm_seal(&viaevp, iv, aad, 20, pt, 30, pt + 30, 70, ct1) == 0 &&
             gcm_seal(&viaprov, iv, aad, 20, pt, 30, pt + 30, 70, ct2) == 0 && memcmp(ct1, ct2, sizeof ct1) == 0 &&
             gcm_open(&viaprov, iv, aad, 20, ct1, 100, ct1 + 100, back) == 0 && memcmp(back, pt, 100) == 0 &&
             (ct1[100] ^= 1, gcm_open(&viaprov, iv, aad, 20, ct1, 100, ct1 + 100, back) == 1);
        aead_free_contexts(&viaevp);
        aead_free_contexts(&viaprov);
    }
    ERR_clear_error();
    if (ok) {
        gcm = f;
        gcm_cipher = cipher;
    } else {
        memset(&gcm, 0, sizeof gcm);
        EVP_CIPHER_free(cipher);
    }
}

static int aead_init(Aead *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"key", "evp", NULL};
    Py_buffer key;
    int evp = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "y*|$p:Aead", names, &key, &evp))
        return -1;
    if (key.len != 32) {
        PyErr_Format(PyExc_ValueError, "AES-256-GCM key must be 32 bytes, got %zd", key.len);
        PyBuffer_Release(&key);
        return -1;
    }
    int bad = aead_key(self, key.buf, evp);
    PyBuffer_Release(&key);
    if (bad) {
        aead_free_contexts(self);
        ERR_clear_error();
        PyErr_SetString(PyExc_RuntimeError, "AES-256-GCM set-up failed");
        return -1;
    }
    return 0;
}

static void aead_dealloc(Aead *self) {
    aead_free_contexts(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *aead_get_backend(Aead *self, void *closure) {
    return PyUnicode_FromString(self->penc ? "provider" : "evp");
}

static int aead_args(PyObject *const *args, Py_ssize_t nargs, Py_buffer *nonce, Py_buffer *data, Py_buffer *aad) {
    if (nargs < 2 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "expected (nonce, data, associated_data=None)");
        return -1;
    }
    aad->obj = NULL;
    aad->buf = NULL;
    aad->len = 0;
    if (PyObject_GetBuffer(args[0], nonce, PyBUF_SIMPLE) < 0)
        return -1;
    if (nonce->len != NONCE) {
        PyBuffer_Release(nonce);
        PyErr_SetString(PyExc_ValueError, "nonce must be 12 bytes");
        return -1;
    }
    if (PyObject_GetBuffer(args[1], data, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(nonce);
        return -1;
    }
    if (nargs == 3 && args[2] != Py_None && PyObject_GetBuffer(args[2], aad, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(nonce);
        PyBuffer_Release(data);
        return -1;
    }
    if (data->len > INT_MAX - 64 || aad->len > INT_MAX) {
        PyBuffer_Release(nonce);
        PyBuffer_Release(data);
        if (aad->obj)
            PyBuffer_Release(aad);
        PyErr_SetString(PyExc_OverflowError, "data too long");
        return -1;
    }
    return 0;
}

static PyObject *aead_encrypt(Aead *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer nonce, data, aad;
    if (aead_args(args, nargs, &nonce, &data, &aad) < 0)
        return NULL;
    PyObject *out = PyBytes_FromStringAndSize(NULL, data.len + TAG);
    int bad = out && gcm_seal(self, nonce.buf, aad.buf, (size_t)aad.len, data.buf, (size_t)data.len, NULL, 0,
                              (uint8_t *)PyBytes_AS_STRING(out)) < 0;
    PyBuffer_Release(&nonce);
    PyBuffer_Release(&data);
    if (aad.obj)
        PyBuffer_Release(&aad);
    if (bad) {
        Py_DECREF(out);
        ERR_clear_error();
        PyErr_SetString(PyExc_RuntimeError, "AES-256-GCM encryption failed");
        return NULL;
    }
    return out;
}

static PyObject *aead_decrypt(Aead *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer nonce, data, aad;
    if (aead_args(args, nargs, &nonce, &data, &aad) < 0)
        return NULL;
    PyObject *out = NULL;
    int ok = 0;
    if (data.len >= TAG) {
        Py_ssize_t n = data.len - TAG;
        out = PyBytes_FromStringAndSize(NULL, n);
        const uint8_t *d = data.buf;
        ok = out && gcm_open(self, nonce.buf, aad.buf, (size_t)aad.len, d, (size_t)n, d + n,
                             (uint8_t *)PyBytes_AS_STRING(out)) == 0;
    }
    PyBuffer_Release(&nonce);
    PyBuffer_Release(&data);
    if (aad.obj)
        PyBuffer_Release(&aad);
    if (!ok) {
        if (out || data.len < TAG) {
            Py_XDECREF(out);
            ERR_clear_error();
            PyErr_SetNone(InvalidTag ? InvalidTag : PyExc_ValueError);
        }
        return NULL;
    }
    return out;
}

static PyMethodDef aead_methods[] = {
    {"encrypt", (PyCFunction)(void (*)(void))aead_encrypt, METH_FASTCALL,
     "encrypt(nonce, data, associated_data) -> ciphertext || tag (as AESGCM.encrypt)"},
    {"decrypt", (PyCFunction)(void (*)(void))aead_decrypt, METH_FASTCALL,
     "decrypt(nonce, data, associated_data) -> plaintext; InvalidTag (as AESGCM.decrypt)"},
    {NULL}};

static PyGetSetDef aead_getset[] = {
    {"backend", (getter)aead_get_backend, NULL, "'provider': the provider's cipher functions; 'evp': EVP", NULL},
    {NULL}};

static PyTypeObject AeadType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "common._kernel.Aead",
    .tp_basicsize = sizeof(Aead),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "AES-256-GCM with its contexts kept: Aead(key32, *, evp=False)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)aead_init,
    .tp_dealloc = (destructor)aead_dealloc,
    .tp_methods = aead_methods,
    .tp_getset = aead_getset,
};

/* The Aead behind a bound ``encrypt``/``decrypt`` method (what the
 * DataPlane's caches hold), or NULL for any other callable. */
static Aead *aead_of(PyObject *callable, void *which) {
    if (!PyCFunction_Check(callable))
        return NULL;
    PyObject *self = PyCFunction_GET_SELF(callable);
    if (!self || Py_TYPE(self) != &AeadType || (void *)PyCFunction_GET_FUNCTION(callable) != which)
        return NULL;
    return (Aead *)self;
}

/* --- ReplayWindow (common/replay.py ReplayWindow) ----------------------------- */

/* The same rule as the reference: a counter is fresh when above the highest
 * accepted (top) or less than ``size`` below it and not yet accepted. Bit
 * ctr % size of a ring holds counter ctr's state; the positions of the
 * counters top passes over are cleared as it advances, so the ring holds
 * exactly the counters in (top - size, top]. */
typedef struct {
    PyObject_HEAD uint64_t top;
    int any; /* top is valid (the reference's top == -1: none accepted) */
    Py_ssize_t size;
    uint64_t *bits;
} Window;

static PyTypeObject WindowType;
#define WINDOW_MAX (1 << 20)

static int window_init(Window *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"size", NULL};
    Py_ssize_t size = 2048;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|n:ReplayWindow", kwlist, &size))
        return -1;
    if (size < 1 || size > WINDOW_MAX) {
        PyErr_Format(PyExc_ValueError, "window size must be 1..%d", WINDOW_MAX);
        return -1;
    }
    PyMem_Free(self->bits);
    self->bits = PyMem_Calloc((size_t)(size + 63) / 64, 8);
    if (!self->bits) {
        PyErr_NoMemory();
        return -1;
    }
    self->size = size;
    self->any = 0;
    self->top = 0;
    return 0;
}

static void window_dealloc(Window *self) {
    PyMem_Free(self->bits);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static inline int wbit(const Window *w, uint64_t ctr) {
    uint64_t i = ctr % (uint64_t)w->size;
    return (int)(w->bits[i >> 6] >> (i & 63) & 1);
}

static inline void wset(Window *w, uint64_t ctr, int on) {
    uint64_t i = ctr % (uint64_t)w->size;
    if (on)
        w->bits[i >> 6] |= (uint64_t)1 << (i & 63);
    else
        w->bits[i >> 6] &= ~((uint64_t)1 << (i & 63));
}

static int window_fresh_raw(const Window *w, uint64_t ctr) {
    if (!w->any || ctr > w->top)
        return 1;
    return w->top - ctr < (uint64_t)w->size && !wbit(w, ctr);
}

static void window_mark_raw(Window *w, uint64_t ctr) {
    if (!w->any || ctr > w->top) {
        uint64_t shift = w->any ? ctr - w->top : (uint64_t)-1;
        if (shift >= (uint64_t)w->size)
            memset(w->bits, 0, (size_t)(w->size + 63) / 64 * 8);
        else
            for (uint64_t c = w->top + 1; c != ctr; c++)
                wset(w, c, 0);
        wset(w, ctr, 1);
        w->top = ctr;
        w->any = 1;
    } else if (w->top - ctr < (uint64_t)w->size) {
        wset(w, ctr, 1);
    }
}

static int ctr_arg(Window *w, PyObject *arg, uint64_t *ctr) {
    if (!w->bits) {
        PyErr_SetString(PyExc_RuntimeError, "ReplayWindow.__init__ was not called");
        return -1;
    }
    unsigned long long c = PyLong_AsUnsignedLongLong(arg);
    if (c == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *ctr = c;
    return 0;
}

static PyObject *window_fresh(Window *self, PyObject *arg) {
    uint64_t c;
    if (ctr_arg(self, arg, &c) < 0)
        return NULL;
    return PyBool_FromLong(window_fresh_raw(self, c));
}

static PyObject *window_mark(Window *self, PyObject *arg) {
    uint64_t c;
    if (ctr_arg(self, arg, &c) < 0)
        return NULL;
    window_mark_raw(self, c);
    Py_RETURN_NONE;
}

static PyObject *window_check_and_mark(Window *self, PyObject *arg) {
    uint64_t c;
    if (ctr_arg(self, arg, &c) < 0)
        return NULL;
    if (!window_fresh_raw(self, c))
        Py_RETURN_FALSE;
    window_mark_raw(self, c);
    Py_RETURN_TRUE;
}

static PyObject *window_get_top(Window *self, void *closure) {
    return self->any ? PyLong_FromUnsignedLongLong(self->top) : PyLong_FromLong(-1);
}

static PyMethodDef window_methods[] = {
    {"fresh", (PyCFunction)window_fresh, METH_O, "fresh(ctr): could ctr still be accepted?"},
    {"mark", (PyCFunction)window_mark, METH_O, "mark(ctr): record an authenticated counter"},
    {"check_and_mark", (PyCFunction)window_check_and_mark, METH_O, "fresh, then mark when it was"},
    {NULL}};

static PyMemberDef window_members[] = {{"size", T_PYSSIZET, offsetof(Window, size), READONLY, NULL}, {NULL}};

static PyGetSetDef window_getset[] = {{"top", (getter)window_get_top, NULL, "highest counter accepted, -1: none", NULL},
                                      {NULL}};

static PyTypeObject WindowType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "common._kernel.ReplayWindow",
    .tp_basicsize = sizeof(Window),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A session's replay window (common/replay.py ReplayWindow): ReplayWindow(size=2048)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)window_init,
    .tp_dealloc = (destructor)window_dealloc,
    .tp_methods = window_methods,
    .tp_members = window_members,
    .tp_getset = window_getset,
};

/* --- Gro ---------------------------------------------------------------------- */

typedef struct {
    uint8_t key[36]; /* pt[12:48]: addresses and ports */
    uint8_t word0[4], ack[4], opts[40];
    int thl, gso, total, hop, psh, npay;
    uint32_t next_seq;
    PyObject *bytes; /* virtio-net header, IPv6 and TCP header of the first segment, payloads */
    Py_ssize_t len;
} Group;

typedef struct {
    PyObject_HEAD int vnet;
    PyObject *writes;
    long long merged;
    Group *open[GRO_MAX_OPEN]; /* in opening order (gro.py's dict order) */
    int nopen;
    Group *last;
} Gro;

static PyTypeObject GroType;
#define GROUP_CAP (VNET_HDR + 40 + MAX_PAYLOAD)

static int gro_init(Gro *self, PyObject *args, PyObject *kw) {
    int vnet;
    if (!PyArg_ParseTuple(args, "p:Gro", &vnet))
        return -1;
    self->vnet = vnet;
    Py_XSETREF(self->writes, PyList_New(0));
    return self->writes ? 0 : -1;
}

static void group_free(Group *g) {
    Py_XDECREF(g->bytes);
    PyMem_Free(g);
}

static void gro_dealloc(Gro *self) {
    for (int i = 0; i < self->nopen; i++)
        group_free(self->open[i]);
    Py_XDECREF(self->writes);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int append_write(Gro *self, PyObject *bytes) { /* steals bytes */
    if (!bytes)
        return -1;
    PyObject *lst = PyList_New(1);
    if (!lst) {
        Py_DECREF(bytes);
        return -1;
    }
    PyList_SET_ITEM(lst, 0, bytes);
    int r = PyList_Append(self->writes, lst);
    Py_DECREF(lst);
    return r;
}

/* gro.py single(): the packet as it goes to the TUN, hop limit replaced */
static int write_single(Gro *self, const uint8_t *pt, Py_ssize_t n, int hop, int vnet) {
    Py_ssize_t pre = vnet ? VNET_HDR : 0;
    PyObject *b = PyBytes_FromStringAndSize(NULL, pre + n - 4);
    if (!b)
        return -1;
    uint8_t *o = (uint8_t *)PyBytes_AS_STRING(b);
    memset(o, 0, pre);
    memcpy(o + pre, pt + 4, n - 4);
    o[pre + 7] = (uint8_t)hop;
    return append_write(self, b);
}

static int group_close(Gro *self, int idx) {
    Group *g = self->open[idx];
    memmove(&self->open[idx], &self->open[idx + 1], (size_t)(self->nopen - idx - 1) * sizeof(Group *));
    self->nopen--;
    if (self->last == g)
        self->last = NULL;
    uint8_t *o = (uint8_t *)PyBytes_AS_STRING(g->bytes);
    if (g->npay == 1) {
        memset(o, 0, VNET_HDR);
        o[VNET_HDR + 7] = (uint8_t)g->hop;
    } else {
        int thl = g->thl;
        unsigned length = (unsigned)(thl + g->total);
        uint16_t v[5] = {(uint16_t)(40 + thl), (uint16_t)g->gso, 40, 16};
        o[0] = 1; /* VIRTIO_NET_HDR_F_NEEDS_CSUM */
        o[1] = 4; /* VIRTIO_NET_HDR_GSO_TCPV6 */
        memcpy(o + 2, v, 8); /* native byte order, as struct "=" */
        uint8_t *ip = o + VNET_HDR, *tcp = ip + 40;
        wr16(ip + 4, length);
        ip[7] = (uint8_t)g->hop;
        tcp[13] |= (uint8_t)g->psh;
        unsigned s = (unsigned)((sum_be(ip + 8, 32) + length + 6) % 0xFFFF);
        wr16(tcp + 16, s ? s : 0xFFFF);
        self->merged += g->npay;
    }
    PyObject *b = g->bytes;
    g->bytes = NULL;
    int r = _PyBytes_Resize(&b, g->len);
    PyMem_Free(g);
    if (r < 0)
        return -1;
    return append_write(self, b);
}

static int find_group(Gro *self, const uint8_t *key) {
    if (self->last && memcmp(self->last->key, key, 36) == 0) {
        for (int i = self->nopen - 1; i >= 0; i--)
            if (self->open[i] == self->last)
                return i;
    }
    for (int i = 0; i < self->nopen; i++)
        if (memcmp(self->open[i]->key, key, 36) == 0)
            return i;
    return -1;
}

/* gro.py Gro.add for a plaintext (inner header included) of n >= 44 bytes */
static int gro_add_raw(Gro *self, const uint8_t *pt, Py_ssize_t n, int hop) {
    if (!self->vnet || pt[10] != 6 || n < 64)
        return write_single(self, pt, n, hop, self->vnet);
    int thl = (pt[56] >> 4) << 2;
    Py_ssize_t size = n - 44 - thl;
    int flags = pt[57];
    const uint8_t *key = pt + 12;
    unsigned iplen = rd16(pt + 8);
    int idx = find_group(self, key);
    if (idx >= 0) {
        Group *g = self->open[idx];
        if (size > 0 && (flags | TCP_PSH) == (TCP_ACK | TCP_PSH) && size <= g->gso && thl == g->thl &&
            hop == g->hop && rd32(pt + 48) == g->next_seq && g->total + size + thl <= MAX_PAYLOAD &&
            memcmp(pt + 52, g->ack, 4) == 0 && memcmp(pt + 4, g->word0, 4) == 0 &&
            memcmp(pt + 64, g->opts, (size_t)(thl - 20)) == 0 && iplen == (unsigned)(thl + size)) {
            memcpy(PyBytes_AS_STRING(g->bytes) + g->len, pt + 44 + thl, (size_t)size);
            g->len += size;
            g->total += (int)size;
            g->next_seq += (uint32_t)size;
            g->npay++;
            if (size < g->gso || flags & TCP_PSH) {
                g->psh = flags & TCP_PSH;
                return group_close(self, idx);
            }
            self->last = g;
            return 0;
        }
        if (group_close(self, idx) < 0)
            return -1;
    }
    if (size > 0 && flags == TCP_ACK && thl >= 20 && iplen == (unsigned)(thl + size)) {
        if (self->nopen >= GRO_MAX_OPEN && group_close(self, 0) < 0)
            return -1;
        Group *g = PyMem_Malloc(sizeof(Group));
        if (!g) {
            PyErr_NoMemory();
            return -1;
        }
        g->bytes = PyBytes_FromStringAndSize(NULL, GROUP_CAP);
        if (!g->bytes) {
            PyMem_Free(g);
            return -1;
        }
        memcpy(g->key, key, 36);
        memcpy(g->word0, pt + 4, 4);
        memcpy(g->ack, pt + 52, 4);
        memcpy(g->opts, pt + 64, (size_t)(thl - 20));
        g->thl = thl;
        g->gso = g->total = (int)size;
        g->hop = hop;
        g->psh = 0;
        g->npay = 1;
        g->next_seq = rd32(pt + 48) + (uint32_t)size;
        memcpy(PyBytes_AS_STRING(g->bytes) + VNET_HDR, pt + 4, (size_t)(n - 4));
        g->len = VNET_HDR + n - 4;
        self->open[self->nopen++] = g;
        self->last = g;
        return 0;
    }
    return write_single(self, pt, n, hop, 1);
}

static PyObject *gro_add(Gro *self, PyObject *args) {
    Py_buffer pt;
    int hop;
    if (!PyArg_ParseTuple(args, "y*i:add", &pt, &hop))
        return NULL;
    int r = -1;
    if (pt.len < 44)
        PyErr_SetString(PyExc_ValueError, "a plaintext holding an IPv6 packet is at least 44 bytes");
    else if (hop < 0 || hop > 255)
        PyErr_SetString(PyExc_ValueError, "hop limit out of range");
    else
        r = gro_add_raw(self, pt.buf, pt.len, hop);
    PyBuffer_Release(&pt);
    if (r < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *gro_flush(Gro *self, PyObject *unused) {
    while (self->nopen)
        if (group_close(self, 0) < 0)
            return NULL;
    PyObject *fresh = PyList_New(0);
    if (!fresh)
        return NULL;
    PyObject *out = self->writes;
    self->writes = fresh;
    return out;
}

static PyObject *gro_get_open(Gro *self, void *closure) { return PyLong_FromLong(self->nopen); }

static PyMethodDef gro_methods[] = {
    {"add", (PyCFunction)gro_add, METH_VARARGS, "add(plaintext, hop): as gro.Gro.add"},
    {"flush", (PyCFunction)gro_flush, METH_NOARGS, "close every open group; the writes in order"},
    {NULL}};

static PyMemberDef gro_members[] = {
    {"writes", T_OBJECT_EX, offsetof(Gro, writes), 0, "buffers lists for os.writev, in order"},
    {"merged", T_LONGLONG, offsetof(Gro, merged), 0, "segments that went out inside a super packet"},
    {"vnet", T_INT, offsetof(Gro, vnet), READONLY, NULL},
    {NULL}};

static PyGetSetDef gro_getset[] = {{"open_groups", (getter)gro_get_open, NULL, "groups still open", NULL}, {NULL}};

static PyTypeObject GroType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "common._kernel.Gro",
    .tp_basicsize = sizeof(Gro),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "GRO in user space for TUN writes (gro.py Gro): Gro(vnet)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)gro_init,
    .tp_dealloc = (destructor)gro_dealloc,
    .tp_methods = gro_methods,
    .tp_members = gro_members,
    .tp_getset = gro_getset,
};

/* --- helpers for the batch loops ---------------------------------------------- */

typedef struct { /* counters bumped at the end of a call; name: a string literal (counter_key caches by its address) */
    const char *name;
    long long n;
} Count;

/* The interned key of a counter name (a string literal: its address is its
 * identity), made once; a new reference. */
static PyObject *counter_key(const char *name) {
    static struct {
        const char *name;
        PyObject *key;
    } cache[64];
    static int used;
    for (int i = 0; i < used; i++)
        if (cache[i].name == name)
            return Py_NewRef(cache[i].key);
    PyObject *key = PyUnicode_InternFromString(name);
    if (key && used < (int)(sizeof cache / sizeof cache[0])) {
        cache[used].name = name;
        cache[used].key = Py_NewRef(key);
        used++;
    }
    return key;
}

static int bump(PyObject *counters, Count *c, int n) {
    for (int i = 0; i < n; i++) {
        if (!c[i].n && c[i].name[0] != '+') /* '+': always present, as the reference adds 0 too */
            continue;
        const char *name = c[i].name[0] == '+' ? c[i].name + 1 : c[i].name;
        PyObject *key = counter_key(name);
        if (!key)
            return -1;
        PyObject *old = PyDict_GetItemWithError(counters, key);
        long long v = c[i].n;
        if (old) {
            long long o = PyLong_AsLongLong(old);
            if (o == -1 && PyErr_Occurred()) {
                Py_DECREF(key);
                return -1;
            }
            v += o;
        } else if (PyErr_Occurred()) {
            Py_DECREF(key);
            return -1;
        }
        PyObject *nv = PyLong_FromLongLong(v);
        int r = nv ? PyDict_SetItem(counters, key, nv) : -1;
        Py_XDECREF(nv);
        Py_DECREF(key);
        if (r < 0)
            return -1;
    }
    return 0;
}

/* n random bytes from the kernel's CSPRNG, as os.urandom takes them
 * (getrandom). Why not RAND_bytes: after an idle spell its DRBG's code and
 * locks are out of the caches, 39 us for the first 12 bytes against 2.4
 * for the system call on the session-17 host, and an idle ping seals
 * twice. -1 with an exception when the kernel refuses. */
static int fill_random(uint8_t *buf, Py_ssize_t n) {
    while (n > 0) {
        ssize_t got = getrandom(buf, (size_t)n, 0);
        if (got < 0) {
            if (errno == EINTR) {
                if (PyErr_CheckSignals() < 0)
                    return -1;
                continue;
            }
            if (errno == ENOSYS && RAND_bytes(buf, (int)n) == 1) /* a kernel before 3.17 */
                return 0;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        buf += got;
        n -= got;
    }
    return 0;
}

/* 12 * n nonce bytes: the kernel's random bytes when the DataPlane's
 * nonce_bytes is os.urandom (the default: random per packet), else its own
 * callable (e.g. per-session counters), called once per batch as the
 * reference does. */
static PyObject *get_nonces(PyObject *source, Py_ssize_t n) {
    Py_ssize_t want = NONCE * n;
    if (source == Urandom || source == Py_None) {
        PyObject *b = PyBytes_FromStringAndSize(NULL, want);
        if (b && fill_random((uint8_t *)PyBytes_AS_STRING(b), want) < 0)
            Py_CLEAR(b);
        return b;
    }
    PyObject *b = PyObject_CallFunction(source, "n", want);
    if (b && (!PyBytes_Check(b) || PyBytes_GET_SIZE(b) != want)) {
        Py_DECREF(b);
        PyErr_Format(PyExc_ValueError, "nonce_bytes(%zd) must return that many bytes", want);
        return NULL;
    }
    return b;
}

/* an output run: packets for one next hop appended to one bytearray that
 * already sits at the end of that hop's parts list */
typedef struct {
    PyObject *out;     /* dp.out */
    PyObject *hop;     /* next hop of the current run (borrowed identity) */
    PyObject *buf;     /* bytearray of the run, NULL when none */
    PyObject *hop_ref; /* strong ref to hop */
    Py_ssize_t used;   /* bytes of buf in use; the rest is room to grow (cut off by run_end) */
    Py_ssize_t hint;   /* bytes the rest of the batch may add: a new run's buffer starts at that (one small
                          allocation for a lone packet, no cut at the end), at most RUN_FIRST */
} Run;

#define RUN_FIRST 16384

static void run_end(Run *r) {
    if (r->buf && PyByteArray_GET_SIZE(r->buf) != r->used) {
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb); /* may run on an error path */
        if (PyByteArray_Resize(r->buf, r->used) < 0)
            PyErr_Clear();
        PyErr_Restore(et, ev, tb);
    }
    r->used = 0;
    Py_CLEAR(r->buf);
    Py_CLEAR(r->hop_ref);
    r->hop = NULL;
}

/* room for ``need`` more bytes at the end of the run for ``hop``; NULL on error */
static uint8_t *run_reserve(Run *r, PyObject *hop, Py_ssize_t need) {
    if (r->buf == NULL || hop != r->hop) {
        run_end(r);
        PyObject *parts = PyDict_GetItemWithError(r->out, hop);
        if (!parts) {
            if (PyErr_Occurred())
                return NULL;
            parts = PyList_New(0);
            if (!parts || PyDict_SetItem(r->out, hop, parts) < 0) {
                Py_XDECREF(parts);
                return NULL;
            }
            Py_DECREF(parts);
        }
        if (!PyList_Check(parts)) {
            PyErr_SetString(PyExc_TypeError, "DataPlane.out values must be lists");
            return NULL;
        }
        Py_ssize_t first = r->hint > 0 && r->hint < RUN_FIRST ? r->hint : RUN_FIRST;
        r->buf = PyByteArray_FromStringAndSize(NULL, first > need ? first : need);
        r->used = 0;
        if (!r->buf || PyList_Append(parts, r->buf) < 0)
            return NULL;
        Py_INCREF(hop);
        r->hop_ref = hop;
        r->hop = hop;
    }
    Py_ssize_t size = PyByteArray_GET_SIZE(r->buf);
    if (r->used + need > size) { /* grow geometrically: one copy per doubling, not per packet */
        Py_ssize_t want = size * 2 > r->used + need ? size * 2 : r->used + need;
        if (want < RUN_FIRST)
            want = RUN_FIRST;
        if (PyByteArray_Resize(r->buf, want) < 0)
            return NULL;
    }
    uint8_t *o = (uint8_t *)PyByteArray_AS_STRING(r->buf) + r->used;
    r->used += need;
    return o;
}

/* one framed data packet: header, addresses, AES-GCM of hdr||body, nonce */
static int seal_frame(Run *r, PyObject *hop_obj, PyObject *encrypt, int hop, const uint8_t *addrs, const uint8_t *nonce,
                      const uint8_t *a, Py_ssize_t an, const uint8_t *b, Py_ssize_t bn) {
    Py_ssize_t body = an + bn + TAG + NONCE;
    Aead *k = aead_of(encrypt, (void *)aead_encrypt);
    PyObject *ct = NULL;
    if (!k) { /* a callable we do not know: as the reference calls it */
        PyObject *pt = PyBytes_FromStringAndSize(NULL, an + bn);
        if (!pt)
            return -1;
        memcpy(PyBytes_AS_STRING(pt), a, (size_t)an);
        memcpy(PyBytes_AS_STRING(pt) + an, b, (size_t)bn);
        PyObject *nb = PyBytes_FromStringAndSize((const char *)nonce, NONCE);
        ct = nb ? PyObject_CallFunctionObjArgs(encrypt, nb, pt, Py_None, NULL) : NULL;
        Py_XDECREF(nb);
        Py_DECREF(pt);
        if (!ct)
            return -1;
        if (!PyBytes_Check(ct)) {
            Py_DECREF(ct);
            PyErr_SetString(PyExc_TypeError, "encrypt must return bytes");
            return -1;
        }
        body = PyBytes_GET_SIZE(ct) + NONCE;
    }
    if (body > 0xFFFF) {
        Py_XDECREF(ct);
        PyErr_SetString(PyExc_OverflowError, "data packet body longer than 65535 bytes");
        return -1;
    }
    uint8_t *o = run_reserve(r, hop_obj, DATA_HDR + body);
    if (!o) {
        Py_XDECREF(ct);
        return -1;
    }
    o[0] = 1;
    o[1] = 0;
    o[2] = o[3] = o[4] = 0;
    wr16(o + 5, (unsigned)body);
    o[7] = (uint8_t)(hop - 1);
    memcpy(o + 8, addrs, 32);
    if (k) {
        if (gcm_seal(k, nonce, NULL, 0, a, (size_t)an, b, (size_t)bn, o + DATA_HDR) < 0) {
            ERR_clear_error();
            PyErr_SetString(PyExc_RuntimeError, "AES-256-GCM encryption failed");
            return -1;
        }
    } else {
        memcpy(o + DATA_HDR, PyBytes_AS_STRING(ct), (size_t)(body - NONCE));
        Py_DECREF(ct);
    }
    memcpy(o + DATA_HDR + body - NONCE, nonce, NONCE);
    return 0;
}

/* --- TSO: cutting a super packet (gso.py split_tcp) ------------------------------- */

typedef struct {
    const uint8_t *p;
    Py_ssize_t len;
    Py_ssize_t off, tcp, data, total;
    int thl, mss, count, flags, middle, first_extra, last_extra;
    uint32_t seq0;
    uint64_t fixed;
} Tso;

/* 0 when the super packet can be cut, -1 for gso.py's SegmentError */
static int tso_parse(Tso *t, const uint8_t *p, Py_ssize_t len, Py_ssize_t off) {
    if (len < VNET_HDR || off < VNET_HDR)
        return -1;
    uint16_t hv[4];
    memcpy(hv, p + 2, 8); /* hdr_len, gso_size, csum_start, csum_offset: native order */
    int gso_type = p[1];
    if ((gso_type & ~0x80) != 4)
        return -1;
    if (len < off + 40 + 20 || p[off + 6] != 6 || hv[2] != 40)
        return -1;
    t->p = p;
    t->len = len;
    t->off = off;
    t->tcp = off + 40;
    t->thl = (p[t->tcp + 12] >> 4) * 4;
    t->data = t->tcp + t->thl;
    t->total = len - t->data;
    t->mss = hv[1];
    if (t->thl < 20 || t->total <= 0 || t->mss <= 0)
        return -1;
    t->count = (int)((t->total + t->mss - 1) / t->mss);
    const uint8_t *th = p + t->tcp;
    t->flags = th[13];
    t->middle = t->flags & ~(TCP_FIN | TCP_PSH | TCP_CWR);
    t->last_extra = t->flags & (TCP_FIN | TCP_PSH);
    t->first_extra = t->flags & TCP_CWR;
    t->seq0 = rd32(th + 4);
    uint64_t f = sum_be(p + off + 8, 32) + 6;
    f += rd16(th) + rd16(th + 2) + rd16(th + 8) + rd16(th + 10) + ((unsigned)th[12] << 8 | (unsigned)t->middle) +
         rd16(th + 14) + sum_be(th + 18, (size_t)(t->thl - 18));
    t->fixed = f % 0xFFFF;
    return 0;
}

/* segment i: its 4-byte inner header + IPv6 + TCP header into hdr (returns
 * its length), its payload at *pay / *size */
static Py_ssize_t tso_segment(const Tso *t, int i, uint8_t *hdr, const uint8_t *prefix, const uint8_t **pay,
                              Py_ssize_t *size) {
    const uint8_t *p = t->p;
    Py_ssize_t start = t->data + (Py_ssize_t)i * t->mss;
    Py_ssize_t sz = t->len - start < t->mss ? t->len - start : t->mss;
    int fl = t->middle | (i == 0 ? t->first_extra : 0) | (i == t->count - 1 ? t->last_extra : 0);
    uint32_t q = t->seq0 + (uint32_t)((uint64_t)i * (uint64_t)t->mss);
    uint64_t x = t->fixed + (q >> 16) + (q & 0xFFFF) + (uint64_t)(t->thl + sz) + sum_be(p + start, (size_t)sz) +
                 (uint64_t)(fl - t->middle);
    memcpy(hdr, prefix, 4);
    uint8_t *ip = hdr + 4, *th = ip + 40;
    memcpy(ip, p + t->off, 40);
    wr16(ip + 4, (unsigned)(t->thl + sz));
    memcpy(th, p + t->tcp, (size_t)t->thl);
    wr32(th + 4, q);
    th[13] = (uint8_t)fl;
    wr16(th + 16, neg_mod(x));
    *pay = p + start;
    *size = sz;
    return 4 + 40 + t->thl;
}

static const uint8_t L3_HEADER[4] = {1, 0, 0, 0};

static PyObject *segment_bytes(const Tso *t, int i) {
    uint8_t hdr[4 + 40 + 60];
    const uint8_t *pay;
    Py_ssize_t sz;
    Py_ssize_t h = tso_segment(t, i, hdr, L3_HEADER, &pay, &sz);
    PyObject *b = PyBytes_FromStringAndSize(NULL, h + sz);
    if (b) {
        memcpy(PyBytes_AS_STRING(b), hdr, (size_t)h);
        memcpy(PyBytes_AS_STRING(b) + h, pay, (size_t)sz);
    }
    return b;
}

static PyObject *SegmentError;

static PyObject *k_split_tcp(PyObject *mod, PyObject *args) {
    Py_buffer p;
    Py_ssize_t off;
    if (!PyArg_ParseTuple(args, "y*n:split_tcp", &p, &off))
        return NULL;
    Tso t;
    PyObject *out = NULL;
    if (off < 0 || tso_parse(&t, p.buf, p.len, off) < 0) {
        PyErr_SetString(SegmentError ? SegmentError : PyExc_ValueError, "super packet cannot be cut");
    } else if ((out = PyList_New(t.count))) {
        for (int i = 0; i < t.count; i++) {
            PyObject *b = segment_bytes(&t, i);
            if (!b) {
                Py_CLEAR(out);
                break;
            }
            PyList_SET_ITEM(out, i, b);
        }
    }
    PyBuffer_Release(&p);
    return out;
}

/* --- from_tun (dataplane.py DataPlane.from_tun) --------------------------------- */

typedef struct {
    PyObject *dp, *now, *routes, *counters, *nonce_src;
    Run run;
    Py_ssize_t off; /* the DataPlane's own offset (virtio-net header) */
    long mtu;
    /* route cache of the last destination /64 (dropped after any call out) */
    uint8_t last_dst[8];
    PyObject *last_route;
    /* the session (SendState) sealed with last: its counter lives here until
     * written back (sess_flush) before any call out and at the end */
    PyObject *sess;
    uint8_t sess_index[4];
    uint64_t sess_ctr;
    Count c[6];
} Tun;

enum { C_TUN_RX, C_SEALED, C_NOT_IPV6, C_BAD_OFFLOAD, C_GSO_SEGMENTS, C_NCOUNT };

/* sess.ctr = the next unused counter; keeps an exception already set
 * (it runs on error paths too: counters handed out must never be reused) */
static int sess_flush(Tun *s) {
    if (!s->sess)
        return 0;
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    PyObject *v = PyLong_FromUnsignedLongLong(s->sess_ctr);
    int r = v ? PyObject_SetAttr(s->sess, N_ctr, v) : -1;
    Py_XDECREF(v);
    Py_CLEAR(s->sess);
    if (et) {
        if (r < 0)
            PyErr_Clear();
        PyErr_Restore(et, ev, tb);
        return -1;
    }
    return r;
}

/* the next counter nonce of session ``sess``: its receiver's index (4) and
 * the counter (8, big-endian), as SendState.nonce() */
static int sess_nonce(Tun *s, PyObject *sess, uint8_t *nonce) {
    if (sess != s->sess) {
        if (sess_flush(s) < 0)
            return -1;
        PyObject *idx = PyObject_GetAttr(sess, N_remote_index);
        if (!idx)
            return -1;
        if (!PyBytes_Check(idx) || PyBytes_GET_SIZE(idx) != 4) {
            Py_DECREF(idx);
            PyErr_SetString(PyExc_TypeError, "a session's remote_index is 4 bytes");
            return -1;
        }
        memcpy(s->sess_index, PyBytes_AS_STRING(idx), 4);
        Py_DECREF(idx);
        PyObject *ctr = PyObject_GetAttr(sess, N_ctr);
        if (!ctr)
            return -1;
        unsigned long long c = PyLong_AsUnsignedLongLong(ctr);
        Py_DECREF(ctr);
        if (c == (unsigned long long)-1 && PyErr_Occurred())
            return -1;
        Py_INCREF(sess);
        s->sess = sess;
        s->sess_ctr = c;
    }
    if (s->sess_ctr == UINT64_MAX) { /* as int.to_bytes(8) would: never wrap a nonce */
        PyErr_SetString(PyExc_OverflowError, "session counter exhausted");
        return -1;
    }
    memcpy(nonce, s->sess_index, 4);
    uint64_t c = s->sess_ctr++;
    for (int i = 0; i < 8; i++)
        nonce[4 + i] = (uint8_t)(c >> (56 - 8 * i));
    return 0;
}

/* before a call out: caches go, the session counter is written back */
static int tun_forget(Tun *s) {
    Py_CLEAR(s->last_route);
    run_end(&s->run);
    return sess_flush(s);
}

/* routes.get(dst /64), with the one-entry cache in front */
static PyObject *tun_route(Tun *s, const uint8_t *dst8) {
    if (s->last_route && memcmp(s->last_dst, dst8, 8) == 0)
        return s->last_route;
    PyObject *k = PyBytes_FromStringAndSize((const char *)dst8, 8);
    if (!k)
        return NULL;
    PyObject *r = PyDict_GetItemWithError(s->routes, k);
    Py_DECREF(k);
    if (!r)
        return PyErr_Occurred() ? NULL : Py_None;
    Py_INCREF(r);
    Py_XSETREF(s->last_route, r);
    memcpy(s->last_dst, dst8, 8);
    return r;
}

/* a route cache entry: (next hop, encrypt, session or None: random nonces) */
static int route_parts(PyObject *r, PyObject **hop, PyObject **encrypt, PyObject **sess) {
    if (!PyTuple_Check(r) || PyTuple_GET_SIZE(r) != 3) {
        PyErr_SetString(PyExc_TypeError, "a route is (next hop, encrypt, session)");
        return -1;
    }
    *hop = PyTuple_GET_ITEM(r, 0);
    *encrypt = PyTuple_GET_ITEM(r, 1);
    *sess = PyTuple_GET_ITEM(r, 2);
    return 0;
}

static PyObject *bytes_of(PyObject *given, const uint8_t *p, Py_ssize_t n) {
    if (given) {
        Py_INCREF(given);
        return given;
    }
    return PyBytes_FromStringAndSize((const char *)p, n);
}

/* a super packet (dataplane.py _from_tun_gso); 0 or -1 on error */
static int tun_gso(Tun *s, const uint8_t *p, Py_ssize_t len) {
    Py_ssize_t off = s->off;
    Tso t;
    if (tso_parse(&t, p, len, off) < 0) {
        s->c[C_BAD_OFFLOAD].n++;
        return 0;
    }
    int n = t.count;
    s->c[C_GSO_SEGMENTS].n += n;
    s->c[C_TUN_RX].n -= 1;
    PyObject *r = tun_route(s, p + off + 24);
    if (!r)
        return -1;
    int hop = p[off + 7];
    Py_ssize_t first = 40 + t.thl + (t.total < t.mss ? t.total : t.mss);
    if (r == Py_None || hop < 2 || (p[off + 8] & 0xFE) != 4 || first > s->mtu) {
        if (tun_forget(s) < 0)
            return -1;
        for (int i = 0; i < n; i++) {
            PyObject *pt = segment_bytes(&t, i);
            PyObject *lst = pt ? PyList_New(1) : NULL;
            if (!lst) {
                Py_XDECREF(pt);
                return -1;
            }
            PyList_SET_ITEM(lst, 0, pt);
            PyObject *res = PyObject_CallMethodObjArgs(s->dp, N_from_tun, lst, s->now, Four, NULL);
            Py_DECREF(lst);
            if (!res)
                return -1;
            Py_DECREF(res);
        }
        return 0;
    }
    PyObject *hop_obj, *encrypt, *sess;
    Py_INCREF(r);
    if (route_parts(r, &hop_obj, &encrypt, &sess) < 0) {
        Py_DECREF(r);
        return -1;
    }
    /* random nonces for the batch, or n counters of the session */
    PyObject *nonces = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)NONCE * n);
    if (nonces && sess == Py_None) {
        Py_SETREF(nonces, get_nonces(s->nonce_src, n));
    } else if (nonces) {
        uint8_t *nw = (uint8_t *)PyBytes_AS_STRING(nonces);
        for (int i = 0; i < n; i++)
            if (sess_nonce(s, sess, nw + NONCE * i) < 0) {
                Py_CLEAR(nonces);
                break;
            }
    }
    if (!nonces) {
        Py_DECREF(r);
        return -1;
    }
    /* the reference appends to out[next_hop] directly, not to the caller's run */
    run_end(&s->run);
    const uint8_t *nb = (const uint8_t *)PyBytes_AS_STRING(nonces);
    int rc = 0;
    /* room for all n frames at once: header, inner header, IPv6, TCP, tag, nonce each, and the payload */
    if (aead_of(encrypt, (void *)aead_encrypt) && run_reserve(&s->run, hop_obj, (Py_ssize_t)n * (DATA_HDR + 4 + 40 + t.thl + TAG + NONCE) + t.total))
        s->run.used = 0;
    else if (PyErr_Occurred())
        rc = -1;
    for (int i = 0; i < n && rc == 0; i++) {
        uint8_t hdr[4 + 40 + 60];
        const uint8_t *pay;
        Py_ssize_t sz;
        Py_ssize_t h = tso_segment(&t, i, hdr, L3_HEADER, &pay, &sz);
        rc = seal_frame(&s->run, hop_obj, encrypt, hop, p + off + 8, nb + NONCE * i, hdr, h, pay, sz);
    }
    run_end(&s->run);
    Py_DECREF(nonces);
    Py_DECREF(r);
    s->c[C_TUN_RX].n += n;
    s->c[C_SEALED].n += n;
    return rc;
}

/* gso.py/dataplane.py finish_checksum into out (len bytes); -1 when the offsets are outside */
static int finish_checksum(const uint8_t *p, Py_ssize_t len, Py_ssize_t off, uint8_t *out) {
    uint16_t hv[2];
    memcpy(hv, p + 6, 4);
    Py_ssize_t start = off + hv[0], field = start + hv[1];
    if (start >= len || field + 2 > len)
        return -1;
    unsigned total = (unsigned)(sum_be(p + start, (size_t)(len - start)) % 0xFFFF);
    memcpy(out, p, (size_t)len);
    out[0] = 0;
    wr16(out + field, 0xFFFF - (total ? total : 0xFFFF));
    return 0;
}

static PyObject *k_from_tun(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "from_tun(dp, pkts, now, off)");
        return NULL;
    }
    PyObject *dp = args[0], *pkts = args[1];
    Py_ssize_t off = PyLong_AsSsize_t(args[3]);
    if (off == -1 && PyErr_Occurred())
        return NULL;
    if (!PyList_Check(pkts)) {
        PyErr_SetString(PyExc_TypeError, "pkts must be a list");
        return NULL;
    }
    if (off < 0 || off > 64) {
        PyErr_SetString(PyExc_ValueError, "offset out of range");
        return NULL;
    }
    Tun s;
    memset(&s, 0, sizeof s);
    s.dp = dp;
    s.now = args[2];
    const char *names[C_NCOUNT] = {"+tun_rx", "+tx_sealed", "tun_rx_not_ipv6", "tun_rx_bad_offload",
                                   "tun_rx_gso_segments"};
    for (int i = 0; i < C_NCOUNT; i++)
        s.c[i].name = names[i];
    PyObject *ret = NULL, *nonces = NULL, *dpoff = NULL, *dpvnet = NULL, *mtu = NULL;
    uint8_t *scratch = NULL;
    if (set_field(dp, &PlaneType, PF_now, N_now, s.now) < 0)
        return NULL;
    if (!(s.routes = PLANE(dp, routes)) || !(s.run.out = PLANE(dp, out)) ||
        !(s.counters = PLANE(dp, counters)) ||
        !(s.nonce_src = PLANE(dp, nonce_bytes)) || !(dpoff = PLANE(dp, off)) ||
        !(dpvnet = PLANE(dp, vnet)) || !(mtu = PLANE(dp, mtu)))
        goto done;
    if (!PyDict_Check(s.routes) || !PyDict_Check(s.run.out) || !PyDict_Check(s.counters)) {
        PyErr_SetString(PyExc_TypeError, "DataPlane routes, out and counters must be dicts");
        goto done;
    }
    s.off = PyLong_AsSsize_t(dpoff);
    s.mtu = PyLong_AsLong(mtu);
    int vnet_attr = PyObject_IsTrue(dpvnet);
    if (PyErr_Occurred() || vnet_attr < 0)
        goto done;
    int vnet = vnet_attr && off == s.off;
    Py_ssize_t n = PyList_GET_SIZE(pkts);
    /* the reference draws a batch's nonces first; random ones are drawn at
     * the first packet that needs one (none when every peer has a session) */
    int lazy = s.nonce_src == Urandom || s.nonce_src == Py_None;
    if (!lazy && !(nonces = get_nonces(s.nonce_src, n)))
        goto done;
    Py_ssize_t ni = 0, sent = 0, rest = 0;
    for (Py_ssize_t i = 0; i < n; i++) { /* what the batch's frames take, a super packet's as one */
        Py_ssize_t len = PyBytes_Check(PyList_GET_ITEM(pkts, i)) ? PyBytes_GET_SIZE(PyList_GET_ITEM(pkts, i)) : 0;
        rest += (len > off ? len - off : 0) + DATA_HDR + 4 + TAG + NONCE;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pobj = PyList_GET_ITEM(pkts, i);
        Py_INCREF(pobj);
        Py_buffer view;
        if (PyObject_GetBuffer(pobj, &view, PyBUF_SIMPLE) < 0) {
            Py_DECREF(pobj);
            goto done;
        }
        const uint8_t *p = view.buf;
        Py_ssize_t len = view.len;
        s.run.hint = rest;
        rest -= (len > off ? len - off : 0) + DATA_HDR + 4 + TAG + NONCE;
        PyObject *given = PyBytes_CheckExact(pobj) ? pobj : NULL; /* the packet as an object, for call-outs */
        int rc = 0;
        if (len < off + 40 || p[off] >> 4 != 6) {
            s.c[C_NOT_IPV6].n++;
            goto next;
        }
        if (vnet && (p[0] || p[1])) {
            if (p[1]) {
                rc = tun_gso(&s, p, len);
                goto next;
            }
            if (p[0] & 1) {
                uint8_t *sc = PyMem_Realloc(scratch, (size_t)len);
                if (!sc) {
                    PyErr_NoMemory();
                    rc = -1;
                    goto next;
                }
                scratch = sc;
                if (finish_checksum(p, len, off, scratch) < 0) {
                    s.c[C_BAD_OFFLOAD].n++;
                    goto next;
                }
                p = scratch;
                given = NULL;
            }
        }
        PyObject *r = tun_route(&s, p + off + 24);
        if (!r) {
            rc = -1;
            goto next;
        }
        if (r == Py_None) {
            if (tun_forget(&s) < 0) {
                rc = -1;
                goto next;
            }
            PyObject *pb = bytes_of(given, p, len);
            r = pb ? PyObject_CallMethodObjArgs(dp, N__route_for_tun, pb, args[3], s.now, NULL) : NULL;
            Py_XDECREF(pb);
            if (!r) {
                rc = -1;
                goto next;
            }
            Py_XSETREF(s.last_route, r); /* keeps it alive; not a cache entry */
            memset(s.last_dst, 0, 8);
            s.last_dst[0] = 0xFF; /* no overlay /64 starts with ff */
            if (r == Py_None) {
                Py_CLEAR(s.last_route);
                goto next;
            }
        }
        int hop = p[off + 7];
        if (hop < 2 || (p[off + 8] & 0xFE) != 4 || len - off > s.mtu) {
            if (tun_forget(&s) < 0) {
                rc = -1;
                goto next;
            }
            PyObject *pb = bytes_of(given, p, len);
            PyObject *h = pb ? PyLong_FromLong(hop) : NULL;
            PyObject *res = h ? PyObject_CallMethodObjArgs(dp, N__tun_exception, pb, args[3], h, s.now, NULL) : NULL;
            Py_XDECREF(h);
            Py_XDECREF(pb);
            if (!res)
                rc = -1;
            Py_XDECREF(res);
            goto next;
        }
        {
            PyObject *hop_obj, *encrypt, *sess;
            Py_INCREF(r);
            if (route_parts(r, &hop_obj, &encrypt, &sess) < 0) {
                Py_DECREF(r);
                rc = -1;
                goto next;
            }
            const uint8_t *nonce;
            uint8_t ctr_nonce[NONCE];
            if (sess == Py_None && !nonces && !(nonces = get_nonces(s.nonce_src, n))) {
                Py_DECREF(r);
                rc = -1;
                goto next;
            }
            if (sess == Py_None) { /* the reference's scheme: random, drawn once per batch */
                nonce = (const uint8_t *)PyBytes_AS_STRING(nonces) + NONCE * ni;
                ni++;
            } else if (sess_nonce(&s, sess, ctr_nonce) < 0) {
                Py_DECREF(r);
                rc = -1;
                goto next;
            } else {
                nonce = ctr_nonce;
            }
            rc = seal_frame(&s.run, hop_obj, encrypt, hop, p + off + 8, nonce, L3_HEADER, 4, p + off, len - off);
            Py_DECREF(r);
            sent++;
        }
    next:
        PyBuffer_Release(&view);
        Py_DECREF(pobj);
        if (rc < 0)
            goto done;
    }
    s.c[C_TUN_RX].n += n;
    s.c[C_SEALED].n += sent;
    if (bump(s.counters, s.c, C_NCOUNT) < 0)
        goto done;
    ret = Py_None;
    Py_INCREF(ret);
done:
    if (tun_forget(&s) < 0)
        Py_CLEAR(ret);
    PyMem_Free(scratch);
    Py_XDECREF(nonces);
    Py_XDECREF(s.routes);
    Py_XDECREF(s.run.out);
    Py_XDECREF(s.counters);
    Py_XDECREF(s.nonce_src);
    Py_XDECREF(dpoff);
    Py_XDECREF(dpvnet);
    Py_XDECREF(mtu);
    return ret;
}

/* --- FirewallRules (common/firewall.py Firewall.allow) ------------------------- */

/* A rule set as Firewall.replace compiles it: the same first-match walk as
 * Firewall._decide (Python keeps a decision cache; the walk here is what it
 * caches), and _l4's look through extension headers. */
typedef struct {
    uint8_t net[16], mask[16];
    int allow, proto, lo, hi; /* proto -1: any; lo -1: any port */
} FwRule;

typedef struct {
    PyObject_HEAD int default_allow, tcp_established;
    Py_ssize_t n;
    FwRule *rules;
} FwRules;

static PyTypeObject FwRulesType;

static int fw_init(FwRules *self, PyObject *args, PyObject *kw) {
    int dflt, est;
    PyObject *list;
    if (!PyArg_ParseTuple(args, "ppO!:FirewallRules", &dflt, &est, &PyList_Type, &list))
        return -1;
    Py_ssize_t n = PyList_GET_SIZE(list);
    FwRule *rules = PyMem_Calloc((size_t)(n ? n : 1), sizeof(FwRule));
    if (!rules) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_buffer net, mask;
        FwRule *r = &rules[i];
        if (!PyArg_ParseTuple(PyList_GET_ITEM(list, i), "py*y*iii:rule", &r->allow, &net, &mask, &r->proto, &r->lo,
                              &r->hi)) {
            PyMem_Free(rules);
            return -1;
        }
        int ok = net.len == 16 && mask.len == 16;
        if (ok) {
            memcpy(r->net, net.buf, 16);
            memcpy(r->mask, mask.buf, 16);
        }
        PyBuffer_Release(&net);
        PyBuffer_Release(&mask);
        if (!ok) {
            PyMem_Free(rules);
            PyErr_SetString(PyExc_ValueError, "a rule's network and mask are 16 bytes");
            return -1;
        }
    }
    PyMem_Free(self->rules);
    self->rules = rules;
    self->n = n;
    self->default_allow = dflt;
    self->tcp_established = est;
    return 0;
}

static void fw_dealloc(FwRules *self) {
    PyMem_Free(self->rules);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

enum { FW_ESTABLISHED, FW_ALLOWED, FW_DENIED };

/* firewall.py _l4 and Firewall.allow for a plaintext of n >= 44 bytes: 1
 * allow, 0 deny; *why: which of its counters */
static int fw_allow_raw(const FwRules *fw, const uint8_t *pt, Py_ssize_t n, int *why) {
    int nh = pt[10], proto, port = -1, flags = -1;
    Py_ssize_t off = 44;
    int done = 0;
    for (int i = 0; i < 4 && !done; i++) {
        if ((nh == 0 || nh == 43 || nh == 60) && off + 8 <= n) {
            int next = pt[off];
            off += ((Py_ssize_t)pt[off + 1] + 1) * 8;
            nh = next;
        } else if (nh == 44 && off + 8 <= n) { /* fragment: ports only in the first one */
            if (rd16(pt + off + 2) & 0xFFF8) {
                nh = pt[off];
                done = 2;
                break;
            }
            nh = pt[off];
            off += 8;
        } else {
            done = 1;
        }
    }
    proto = nh;
    if (done != 2 && (nh == 6 || nh == 17) && off + 4 <= n) {
        port = rd16(pt + off + 2);
        flags = nh == 6 && off + 14 <= n ? pt[off + 13] : -1;
    }
    if (proto == 6 && fw->tcp_established && flags >= 0 && (flags & 0x12) != 0x02) {
        *why = FW_ESTABLISHED;
        return 1;
    }
    int ok = fw->default_allow;
    const uint8_t *src = pt + 12;
    for (Py_ssize_t i = 0; i < fw->n; i++) {
        const FwRule *r = &fw->rules[i];
        int match = 1;
        for (int j = 0; j < 16 && match; j++)
            match = (src[j] & r->mask[j]) == r->net[j];
        if (!match || (r->proto >= 0 && r->proto != proto) || (r->lo >= 0 && !(r->lo <= port && port <= r->hi)))
            continue;
        ok = r->allow;
        break;
    }
    *why = ok ? FW_ALLOWED : FW_DENIED;
    return ok;
}

static PyObject *fw_allow(FwRules *self, PyObject *arg) {
    Py_buffer pt;
    if (PyObject_GetBuffer(arg, &pt, PyBUF_SIMPLE) < 0)
        return NULL;
    int why = 0, ok = -1;
    if (pt.len < 44)
        PyErr_SetString(PyExc_ValueError, "a plaintext holding an IPv6 packet is at least 44 bytes");
    else
        ok = fw_allow_raw(self, pt.buf, pt.len, &why);
    PyBuffer_Release(&pt);
    if (ok < 0)
        return NULL;
    return Py_BuildValue("(Ni)", PyBool_FromLong(ok), why);
}

static PyMethodDef fw_methods[] = {
    {"allow", (PyCFunction)fw_allow, METH_O,
     "allow(plaintext) -> (allowed, counter: 0 established, 1 allowed, 2 denied), as Firewall.allow"},
    {NULL}};

static PyTypeObject FwRulesType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "common._kernel.FirewallRules",
    .tp_basicsize = sizeof(FwRules),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "FirewallRules(default_allow, tcp_established, [(allow, net16, mask16, proto|-1, lo|-1, hi)])",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)fw_init,
    .tp_dealloc = (destructor)fw_dealloc,
    .tp_methods = fw_methods,
};

/* --- from_peer (dataplane.py DataPlane.from_peer) ------------------------------- */

enum {
    P_OPENED, P_MALFORMED, P_DECRYPT_FAILED, P_INNER_MALFORMED, P_SPOOFED, P_NO_TUN, P_REPLAY, P_DOWNGRADE, P_FIREWALL,
    P_NCOUNT
};

/* the receive session (RecvState) of the last session index seen, with what
 * the loop needs of it; ``used`` is owed to it until rs_forget */
typedef struct {
    PyObject *rs, *window, *aead;
    uint8_t index[4], prefix[8];
    int confirmed, used;
} RsCache;

/* rs.used = now if owed; the cache goes. Keeps an exception already set. */
static int rs_forget(RsCache *c, PyObject *now) {
    int r = 0;
    if (c->rs && c->used) {
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        r = PyObject_SetAttr(c->rs, N_used, now);
        if (et) {
            if (r < 0)
                PyErr_Clear();
            PyErr_Restore(et, ev, tb);
            r = -1;
        }
    }
    Py_CLEAR(c->rs);
    Py_CLEAR(c->window);
    Py_CLEAR(c->aead);
    c->used = 0;
    return r;
}

/* by_index.get(index) into the cache: 1 found, 0 not, -1 error */
static int rs_lookup(RsCache *c, PyObject *by_index, const uint8_t *index, PyObject *now) {
    if (c->rs && memcmp(c->index, index, 4) == 0)
        return 1;
    PyObject *k = PyBytes_FromStringAndSize((const char *)index, 4);
    if (!k)
        return -1;
    PyObject *rs = PyDict_GetItemWithError(by_index, k);
    Py_DECREF(k);
    if (!rs) /* a random nonce (static key): the cached session stays for the next packet */
        return PyErr_Occurred() ? -1 : 0;
    Py_INCREF(rs);
    if (rs_forget(c, now) < 0) {
        Py_DECREF(rs);
        return -1;
    }
    c->rs = rs;
    memcpy(c->index, index, 4);
    PyObject *prefix = PyObject_GetAttr(rs, N_prefix), *conf = NULL;
    int ok = prefix && PyBytes_Check(prefix) && PyBytes_GET_SIZE(prefix) == 8;
    if (ok)
        memcpy(c->prefix, PyBytes_AS_STRING(prefix), 8);
    else if (prefix)
        memset(c->prefix, 0xFF, 8); /* matches no source: a prefix is 8 bytes (rs.prefix == spre fails) */
    ok = prefix && (c->window = PyObject_GetAttr(rs, N_window)) && (c->aead = PyObject_GetAttr(rs, N_aead)) &&
         (conf = PyObject_GetAttr(rs, N_confirmed));
    Py_XDECREF(prefix);
    c->confirmed = ok ? PyObject_IsTrue(conf) : -1;
    Py_XDECREF(conf);
    if (c->confirmed < 0) {
        rs_forget(c, now);
        return -1;
    }
    return 1;
}

/* window.fresh(ctr): 1, 0 or -1 on error (the reference's Python window too) */
static int rs_fresh(RsCache *c, uint64_t ctr) {
    if (Py_TYPE(c->window) == &WindowType && ((Window *)c->window)->bits)
        return window_fresh_raw((Window *)c->window, ctr);
    PyObject *v = PyLong_FromUnsignedLongLong(ctr);
    PyObject *r = v ? PyObject_CallMethodOneArg(c->window, N_fresh, v) : NULL;
    Py_XDECREF(v);
    int f = r ? PyObject_IsTrue(r) : -1;
    Py_XDECREF(r);
    return f;
}

static int rs_mark(RsCache *c, uint64_t ctr) {
    if (Py_TYPE(c->window) == &WindowType && ((Window *)c->window)->bits) {
        window_mark_raw((Window *)c->window, ctr);
        return 0;
    }
    PyObject *v = PyLong_FromUnsignedLongLong(ctr);
    PyObject *r = v ? PyObject_CallMethodOneArg(c->window, N_mark, v) : NULL;
    Py_XDECREF(v);
    Py_XDECREF(r);
    return r ? 0 : -1;
}

/* decrypt(nonce, ct||tag) with an Aead or any object with the AESGCM
 * interface: 0 and the plaintext in pt or *ptobj, 1 authentication failed, -1 error */
static int open_with(PyObject *aead, PyObject *decrypt, const uint8_t *nonce, const uint8_t *ct, Py_ssize_t n,
                     uint8_t *pt, PyObject **ptobj) {
    Aead *k = aead && Py_TYPE(aead) == &AeadType ? (Aead *)aead : decrypt ? aead_of(decrypt, (void *)aead_decrypt) : NULL;
    if (k)
        return gcm_open(k, nonce, NULL, 0, ct, (size_t)n, ct + n, pt) != 0;
    PyObject *fn = decrypt;
    if (fn)
        Py_INCREF(fn);
    else if (!(fn = PyObject_GetAttr(aead, N_decrypt)))
        return -1;
    PyObject *nb = PyBytes_FromStringAndSize((const char *)nonce, NONCE);
    PyObject *cb = nb ? PyBytes_FromStringAndSize((const char *)ct, n + TAG) : NULL;
    PyObject *res = cb ? PyObject_CallFunctionObjArgs(fn, nb, cb, Py_None, NULL) : NULL;
    Py_XDECREF(nb);
    Py_XDECREF(cb);
    Py_DECREF(fn);
    if (!res) {
        if (InvalidTag && PyErr_ExceptionMatches(InvalidTag)) {
            PyErr_Clear();
            return 1;
        }
        return -1;
    }
    if (!PyBytes_Check(res) || PyBytes_GET_SIZE(res) < 4) {
        Py_DECREF(res);
        PyErr_SetString(PyExc_TypeError, "decrypt must return bytes of an inner header at least");
        return -1;
    }
    *ptobj = res;
    return 0;
}

/* dp.<method>(source address (16 bytes), now): the security call-outs */
static int call_src(PyObject *dp, PyObject *method, const uint8_t *src, PyObject *now) {
    PyObject *s = PyBytes_FromStringAndSize((const char *)src, 16);
    PyObject *res = s ? PyObject_CallMethodObjArgs(dp, method, s, now, NULL) : NULL;
    Py_XDECREF(s);
    Py_XDECREF(res);
    return res ? 0 : -1;
}

/* from_peer's plaintext buffer: one kept for the process (a fresh 64 KiB
 * allocation is a cold malloc and free per call after an idle spell), a
 * new one when a call-out re-enters while it is taken */
static uint8_t scratch_buf[MAX_PAYLOAD + 64];
static int scratch_busy;

static uint8_t *scratch_take(void) {
    if (!scratch_busy) {
        scratch_busy = 1;
        return scratch_buf;
    }
    return PyMem_Malloc(MAX_PAYLOAD + 64);
}

static void scratch_give(uint8_t *p) {
    if (p == scratch_buf)
        scratch_busy = 0;
    else
        PyMem_Free(p);
}

static PyObject *k_from_peer(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "from_peer(dp, blob, now)");
        return NULL;
    }
    PyObject *dp = args[0], *now = args[2];
    Count c[P_NCOUNT] = {{"+rx_opened", 0},         {"rx_malformed", 0},      {"rx_decrypt_failed", 0},
                         {"rx_inner_malformed", 0}, {"rx_spoofed_source", 0}, {"rx_l3_no_tun", 0},
                         {"replay", 0},             {"rx_downgrade", 0},      {"rx_firewall_dropped", 0}};
    PyObject *keys_in = NULL, *gro = NULL, *tunobj = NULL, *messages = NULL, *counters = NULL, *ret = NULL;
    PyObject *sessions = NULL, *by_index = NULL, *capable = NULL, *filt = NULL, *seen = NULL, *order = NULL;
    PyObject *fsize = NULL, *ffilter = NULL, *fwobj = NULL, *fwrules = NULL, *fwcounters = NULL;
    Count fwc[3] = {{"fw_allowed_established", 0}, {"fw_allowed", 0}, {"fw_denied", 0}};
    PyObject *last_key = NULL; /* cached keys_in value for last_pre */
    RsCache rc_ = {0}, *rsc = &rc_;
    PyObject *via_rs = NULL;
    uint8_t last_pre[8];
    uint8_t *pt = NULL;
    Py_ssize_t seen_max = 0;
    Py_buffer view;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (set_field(dp, &PlaneType, PF_now, N_now, now) < 0)
        goto done;
    if (!(keys_in = PLANE(dp, keys_in)) || !(gro = PLANE(dp, gro)) ||
        !(tunobj = PLANE(dp, tun)) || !(messages = PLANE(dp, messages)) ||
        !(counters = PLANE(dp, counters)) || !(sessions = PLANE(dp, sessions)) ||
        !(by_index = PLANE(dp, by_index)) || !(capable = PLANE(dp, capable)) ||
        !(ffilter = PLANE(dp, filter_nonces)) ||
        !(filt = PLANE(dp, nonce_filter)) || !(seen = PyObject_GetAttr(filt, N_seen)) ||
        !(order = PyObject_GetAttr(filt, N_order)) || !(fsize = PyObject_GetAttr(filt, N_size)))
        goto done;
    if (!PyDict_Check(keys_in) || !PyDict_Check(counters) || !PyList_Check(messages) || !PyDict_Check(by_index) ||
        !PyAnySet_Check(capable) || !PyAnySet_Check(seen)) {
        PyErr_SetString(PyExc_TypeError,
                        "DataPlane keys_in, counters, by_index must be dicts, messages a list, capable and seen sets");
        goto done;
    }
    int tun = PyObject_IsTrue(tunobj), filter_nonces = PyObject_IsTrue(ffilter);
    seen_max = PyLong_AsSsize_t(fsize);
    if (tun < 0 || filter_nonces < 0 || (seen_max == -1 && PyErr_Occurred()))
        goto done;
    int have_sessions = sessions != Py_None;
    if (!(fwobj = PLANE(dp, firewall)))
        goto done;
    if (fwobj != Py_None) { /* its rules compiled for the kernel (Firewall.native) and its counters */
        if (!(fwrules = PyObject_GetAttr(fwobj, N_native)) ||
            !(fwcounters = PyObject_GetAttr(fwobj, N_counters)))
            goto done;
        if (Py_TYPE(fwrules) != &FwRulesType || !PyDict_Check(fwcounters)) {
            PyErr_SetString(PyExc_TypeError, "DataPlane.firewall.native must be the kernel's FirewallRules");
            goto done;
        }
    }
    const FwRules *fw = (const FwRules *)fwrules;
    Gro *ngro = Py_TYPE(gro) == &GroType ? (Gro *)gro : NULL;
    if (!(pt = scratch_take())) {
        PyErr_NoMemory();
        goto done;
    }
    const uint8_t *b = view.buf;
    Py_ssize_t end = view.len, pos = 0;
/* before any call back into the DataPlane: what was cached may change */
#define FORGET()                                                                                                       \
    do {                                                                                                               \
        Py_CLEAR(last_key);                                                                                            \
        if (rs_forget(rsc, now) < 0)                                                                                   \
            goto done;                                                                                                 \
    } while (0)
    while (pos + DATA_HDR <= end) {
        if (b[pos] != 1 || b[pos + 1] != 0) {
            c[P_MALFORMED].n++;
            break;
        }
        Py_ssize_t e = pos + DATA_HDR + rd16(b + pos + 5);
        if (e > end) {
            c[P_MALFORMED].n++;
            break;
        }
        const uint8_t *spre = b + pos + 8;
        const uint8_t *ct = b + pos + DATA_HDR, *nonce = b + e - NONCE;
        Py_ssize_t n = e - NONCE - TAG - (pos + DATA_HDR); /* plaintext length (when a tag fits) */
        PyObject *ptobj = NULL; /* the plaintext as bytes when a call-out needs it */
        const uint8_t *p = pt;
        int via_session = 0;
        Py_CLEAR(via_rs); /* the session a packet opened under, for the engine */
        /* -- sessions (docs/EXTENSIONS.md 9): a known index in the nonce -> its key and replay window */
        if (PyDict_GET_SIZE(by_index) && e - pos >= DATA_HDR + MIN_SEALED) {
            int found = rs_lookup(rsc, by_index, nonce, now);
            if (found < 0)
                goto done;
            if (found && memcmp(rsc->prefix, spre, 8) == 0) {
                uint64_t ctr = 0;
                for (int i = 4; i < NONCE; i++)
                    ctr = ctr << 8 | nonce[i];
                int fresh = rs_fresh(rsc, ctr);
                if (fresh < 0)
                    goto done;
                if (!fresh) {
                    c[P_REPLAY].n++;
                    pos = e;
                    continue;
                }
                int r = open_with(rsc->aead, NULL, nonce, ct, n, pt, &ptobj);
                if (r < 0)
                    goto done;
                if (r == 0) {
                    via_session = 1;
                    via_rs = rsc->rs;
                    Py_INCREF(via_rs);
                    if (rs_mark(rsc, ctr) < 0) {
                        Py_XDECREF(ptobj);
                        goto done;
                    }
                    rsc->used = 1;
                    if (!rsc->confirmed) {
                        PyObject *rs = rsc->rs;
                        Py_INCREF(rs);
                        Py_CLEAR(last_key);
                        int fr = rs_forget(rsc, now);
                        PyObject *res = fr < 0 ? NULL : PyObject_CallMethodObjArgs(sessions, N_confirm, rs, now, NULL);
                        Py_DECREF(rs);
                        Py_XDECREF(res);
                        if (!res) {
                            Py_XDECREF(ptobj);
                            goto done;
                        }
                    }
                }
                /* r == 1: a random nonce that happens to start with an index: try the static key */
            }
        }
        if (!via_session) {
            PyObject *decrypt;
            if (last_key && memcmp(last_pre, spre, 8) == 0) {
                decrypt = last_key;
            } else {
                PyObject *k = PyBytes_FromStringAndSize((const char *)spre, 8);
                if (!k)
                    goto done;
                decrypt = PyDict_GetItemWithError(keys_in, k);
                Py_DECREF(k);
                if (!decrypt && PyErr_Occurred())
                    goto done;
                Py_XINCREF(decrypt);
                Py_XSETREF(last_key, decrypt);
                memcpy(last_pre, spre, 8);
                if (decrypt == NULL) {
                    FORGET();
                    PyObject *src = PyBytes_FromStringAndSize((const char *)spre, 16);
                    decrypt = src ? PyObject_CallMethodObjArgs(dp, N__key_for_src, src, NULL) : NULL;
                    Py_XDECREF(src);
                    if (!decrypt)
                        goto done;
                    if (decrypt == Py_None) {
                        Py_DECREF(decrypt);
                        PyObject *frame = PyBytes_FromStringAndSize((const char *)b + pos, e - pos);
                        PyObject *res = frame ? PyObject_CallMethodObjArgs(dp, N__queue_in, frame, now, NULL) : NULL;
                        Py_XDECREF(frame);
                        if (!res)
                            goto done;
                        Py_DECREF(res);
                        pos = e;
                        continue;
                    }
                    last_key = decrypt; /* for this packet only: dropped after the next call out */
                    memset(last_pre, 0, 8);
                    last_pre[0] = 0xFF;
                }
            }
            if (e - pos < DATA_HDR + MIN_SEALED) {
                c[P_DECRYPT_FAILED].n++;
                pos = e;
                continue;
            }
            PyObject *nonce_obj = NULL;
            if (filter_nonces) { /* an exact replay of a recent static-key packet */
                if (!(nonce_obj = PyBytes_FromStringAndSize((const char *)nonce, NONCE)))
                    goto done;
                int in = PySet_Contains(seen, nonce_obj);
                if (in) {
                    Py_DECREF(nonce_obj);
                    if (in < 0)
                        goto done;
                    c[P_REPLAY].n++;
                    pos = e;
                    continue;
                }
            }
            int py_call = !aead_of(decrypt, (void *)aead_decrypt);
            Py_INCREF(decrypt);
            int r = open_with(NULL, decrypt, nonce, ct, n, pt, &ptobj);
            Py_DECREF(decrypt);
            if (py_call)
                Py_CLEAR(last_key); /* a Python callable ran: keys_in may have changed */
            if (r != 0) {
                Py_XDECREF(nonce_obj);
                if (r < 0)
                    goto done;
                c[P_DECRYPT_FAILED].n++;
                if (have_sessions) {
                    FORGET();
                    if (call_src(dp, N__undecryptable, spre, now) < 0)
                        goto done;
                }
                pos = e;
                continue;
            }
            if (nonce_obj) { /* NonceFilter.add, inline (a random nonce is never already there) */
                int bad = PySet_Add(seen, nonce_obj) < 0;
                PyObject *res = bad ? NULL : PyObject_CallMethodOneArg(order, N_append, nonce_obj);
                Py_DECREF(nonce_obj);
                if (!res) {
                    Py_XDECREF(ptobj);
                    goto done;
                }
                Py_DECREF(res);
                Py_ssize_t len = PyObject_Size(order);
                if (len > seen_max) {
                    PyObject *old = len < 0 ? NULL : PyObject_CallMethodNoArgs(order, N_popleft);
                    int d = old ? PySet_Discard(seen, old) : -1;
                    Py_XDECREF(old);
                    if (d < 0) {
                        Py_XDECREF(ptobj);
                        goto done;
                    }
                }
            }
            if (ptobj) {
                p = (const uint8_t *)PyBytes_AS_STRING(ptobj);
                n = PyBytes_GET_SIZE(ptobj);
            }
            if (PySet_GET_SIZE(capable) && p[1] != 0x10) { /* static key from a peer that negotiated sessions */
                PyObject *k = PyBytes_FromStringAndSize((const char *)spre, 8);
                int in = k ? PySet_Contains(capable, k) : -1;
                Py_XDECREF(k);
                if (in) {
                    Py_XDECREF(ptobj);
                    if (in < 0)
                        goto done;
                    c[P_DOWNGRADE].n++;
                    FORGET();
                    if (call_src(dp, N__static_refused, spre, now) < 0)
                        goto done;
                    pos = e;
                    continue;
                }
            }
        } else if (ptobj) {
            p = (const uint8_t *)PyBytes_AS_STRING(ptobj);
            n = PyBytes_GET_SIZE(ptobj);
        }
        c[P_OPENED].n++;
        int kind = p[1], hop = b[pos + 7], rc = 0;
        if (p[0] != 1) {
            c[P_INNER_MALFORMED].n++;
        } else if (kind == 0) {
            if (n < 44 || p[4] >> 4 != 6) {
                c[P_INNER_MALFORMED].n++;
            } else {
                int own = memcmp(p + 12, spre, 8) == 0;
                if (!own) {
                    Py_CLEAR(last_key);
                    rc = rs_forget(rsc, now);
                    PyObject *isrc = rc ? NULL : PyBytes_FromStringAndSize((const char *)p + 12, 16);
                    PyObject *sp = isrc ? PyBytes_FromStringAndSize((const char *)spre, 8) : NULL;
                    PyObject *res = sp ? PyObject_CallMethodObjArgs(dp, N__same_owner, isrc, sp, NULL) : NULL;
                    Py_XDECREF(isrc);
                    Py_XDECREF(sp);
                    own = res ? PyObject_IsTrue(res) : -1;
                    Py_XDECREF(res);
                    if (own < 0)
                        rc = -1;
                    else if (!own)
                        c[P_SPOOFED].n++;
                }
                int why = 0;
                if (own > 0 && fw && !fw_allow_raw(fw, p, n, &why)) {
                    fwc[why].n++;
                    c[P_FIREWALL].n++;
                } else if (own > 0) {
                    if (fw)
                        fwc[why].n++;
                    if (!tun) {
                        c[P_NO_TUN].n++;
                    } else if (ngro) {
                        rc = gro_add_raw(ngro, p, n, hop);
                    } else {
                        PyObject *pb = bytes_of(ptobj, p, n);
                        PyObject *h = pb ? PyLong_FromLong(hop) : NULL;
                        PyObject *res = h ? PyObject_CallMethodObjArgs(gro, N_add, pb, h, NULL) : NULL;
                        Py_XDECREF(pb);
                        Py_XDECREF(h);
                        rc = res ? 0 : -1;
                        Py_XDECREF(res);
                    }
                }
            }
        } else if (kind == 1) {
            PyObject *t = Py_BuildValue("(y#y#N)", b + pos + 8, (Py_ssize_t)16, b + pos + 24, (Py_ssize_t)16,
                                        bytes_of(ptobj, p, n));
            rc = t ? PyList_Append(messages, t) : -1;
            Py_XDECREF(t);
        } else if (kind == 2) {
            Py_CLEAR(last_key);
            rc = rs_forget(rsc, now);
            PyObject *pb = rc ? NULL : bytes_of(ptobj, p, n);
            PyObject *src = pb ? PyBytes_FromStringAndSize((const char *)b + pos + 8, 16) : NULL;
            PyObject *dst = src ? PyBytes_FromStringAndSize((const char *)b + pos + 24, 16) : NULL;
            PyObject *h = dst ? PyLong_FromLong(hop) : NULL;
            PyObject *res = h ? PyObject_CallMethodObjArgs(dp, N__oob_in, pb, src, dst, h, NULL) : NULL;
            Py_XDECREF(pb);
            Py_XDECREF(src);
            Py_XDECREF(dst);
            Py_XDECREF(h);
            rc = res ? 0 : -1;
            Py_XDECREF(res);
        } else if (kind == 0x10 && have_sessions) { /* negotiation: the session engine's (engine.on_packet) */
            PyObject *rs = via_session ? via_rs : Py_None;
            Py_INCREF(rs);
            Py_CLEAR(last_key);
            rc = rs_forget(rsc, now);
            PyObject *pb = rc ? NULL : bytes_of(ptobj, p, n);
            PyObject *src = pb ? PyBytes_FromStringAndSize((const char *)b + pos + 8, 16) : NULL;
            PyObject *res = src ? PyObject_CallMethodObjArgs(dp, N__session_in, pb, src, rs, now, NULL) : NULL;
            Py_XDECREF(pb);
            Py_XDECREF(src);
            Py_DECREF(rs);
            rc = res ? 0 : -1;
            Py_XDECREF(res);
        } else {
            c[P_INNER_MALFORMED].n++; /* what the reference does with an unknown type */
        }
        Py_XDECREF(ptobj);
        Py_CLEAR(via_rs);
        if (rc < 0)
            goto done;
        pos = e;
    }
#undef FORGET
    if (bump(counters, c, P_NCOUNT) < 0 || (fwcounters && bump(fwcounters, fwc, 3) < 0))
        goto done;
    ret = Py_None;
    Py_INCREF(ret);
done:
    if (rs_forget(rsc, now) < 0)
        Py_CLEAR(ret);
    Py_XDECREF(via_rs);
    PyBuffer_Release(&view);
    scratch_give(pt);
    Py_XDECREF(last_key);
    Py_XDECREF(keys_in);
    Py_XDECREF(gro);
    Py_XDECREF(tunobj);
    Py_XDECREF(messages);
    Py_XDECREF(counters);
    Py_XDECREF(sessions);
    Py_XDECREF(by_index);
    Py_XDECREF(capable);
    Py_XDECREF(filt);
    Py_XDECREF(seen);
    Py_XDECREF(order);
    Py_XDECREF(fsize);
    Py_XDECREF(ffilter);
    Py_XDECREF(fwobj);
    Py_XDECREF(fwrules);
    Py_XDECREF(fwcounters);
    return ret;
}

/* --- peerd: a read whose packets are all for this node (local_batch.py) ---------- */

/* One run of packets of one flow, as all_local and link_rx report them:
 * (source + destination, packets, body bytes) appended to runs; -1 an exception. */
static int append_run(PyObject *runs, const uint8_t *addrs, Py_ssize_t packets, long long body_bytes) {
    PyObject *t = Py_BuildValue("(y#nL)", addrs, (Py_ssize_t)32, packets, body_bytes);
    int rc = t ? PyList_Append(runs, t) : -1;
    Py_XDECREF(t);
    return rc;
}

static PyObject *k_all_local(PyObject *mod, PyObject *args) {
    PyObject *bufobj, *offsets;
    Py_buffer own;
    if (!PyArg_ParseTuple(args, "OO!y*:all_local", &bufobj, &PyList_Type, &offsets, &own))
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(bufobj, &view, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&own);
        return NULL;
    }
    PyObject *ret = NULL, *ranges = NULL, *runs = NULL;
    Py_ssize_t n = PyList_GET_SIZE(offsets);
    Py_ssize_t *offs = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(Py_ssize_t));
    uint8_t *b = view.buf;
    if (!offs) {
        PyErr_NoMemory();
        goto done;
    }
    if (own.len != 8 || n == 0) {
        PyErr_SetString(PyExc_ValueError, "own_prefix is 8 bytes, offsets not empty");
        goto done;
    }
    int local = 1;
    for (Py_ssize_t i = 0; i < n; i++) { /* everything checked before anything is changed */
        Py_ssize_t o = PyLong_AsSsize_t(PyList_GET_ITEM(offsets, i));
        if (o == -1 && PyErr_Occurred())
            goto done;
        if (o < 0 || o + DATA_HDR > view.len || o + DATA_HDR + rd16(b + o + 5) > view.len) {
            PyErr_SetString(PyExc_IndexError, "offset of a data packet outside the buffer");
            goto done;
        }
        offs[i] = o;
        if (b[o + 7] < 2 || memcmp(b + o + 24, own.buf, 8) != 0)
            local = 0;
    }
    if (!local) {
        ret = Py_None;
        Py_INCREF(ret);
        goto done;
    }
    if (!(ranges = PyList_New(0)) || !(runs = PyList_New(0)))
        goto done;
    Py_ssize_t rstart = offs[0], run_at = 0;
    long long run_bytes = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t o = offs[i];
        b[o + 7]--;
        Py_ssize_t end = o + DATA_HDR + rd16(b + o + 5);
        if (i + 1 == n || offs[i + 1] != end) { /* a contiguous range ends here */
            PyObject *t = Py_BuildValue("(nn)", rstart, end);
            if (!t || PyList_Append(ranges, t) < 0) {
                Py_XDECREF(t);
                goto done;
            }
            Py_DECREF(t);
            if (i + 1 < n)
                rstart = offs[i + 1];
        }
        run_bytes += rd16(b + o + 5);
        if (i + 1 == n || memcmp(b + offs[i + 1] + 8, b + o + 8, 32) != 0) { /* a run of one flow ends */
            if (append_run(runs, b + offs[run_at] + 8, i + 1 - run_at, run_bytes) < 0)
                goto done;
            run_at = i + 1;
            run_bytes = 0;
        }
    }
    ret = PyTuple_Pack(2, ranges, runs);
done:
    Py_XDECREF(ranges);
    Py_XDECREF(runs);
    PyMem_Free(offs);
    PyBuffer_Release(&view);
    PyBuffer_Release(&own);
    return ret;
}

/* --- module --------------------------------------------------------------------- */

static PyObject *k_configure(PyObject *mod, PyObject *args) {
    PyObject *invalid, *urandom, *segerr;
    if (!PyArg_ParseTuple(args, "OOO:configure", &invalid, &urandom, &segerr))
        return NULL;
    Py_INCREF(invalid);
    Py_XSETREF(InvalidTag, invalid);
    Py_INCREF(urandom);
    Py_XSETREF(Urandom, urandom);
    Py_INCREF(segerr);
    Py_XSETREF(SegmentError, segerr);
    Py_RETURN_NONE;
}

/* --- tund's IO around the kernel: TUN reads, ring hand-over ---------------------------
 *
 * Why in C: an idle ping wakes tund and peerd cold (the interpreter's code
 * and data out of the caches after a halted vCPU); each Python-level step
 * of a wake-up then costs tens of µs. These are the reads that start one
 * and the hand-overs and writes that end it; each names its Python
 * reference (services/tund/tun.py, common/datapath.py).
 */

static PyObject *tun_spare; /* a READ_SIZE bytes object the next read goes into */

static PyObject *k_read_tun(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "read_tun(fd, max_packets, budget, size)");
        return NULL;
    }
    long fd = PyLong_AsLong(args[0]);
    Py_ssize_t maxp = PyLong_AsSsize_t(args[1]), budget = PyLong_AsSsize_t(args[2]), size = PyLong_AsSsize_t(args[3]);
    if (PyErr_Occurred())
        return NULL;
    if (fd < 0 || fd > INT32_MAX || maxp < 0 || size <= 0 || size > (1 << 20)) {
        PyErr_SetString(PyExc_ValueError, "read_tun: fd, max_packets or size out of range");
        return NULL;
    }
    PyObject *pkts = PyList_New(0);
    if (!pkts)
        return NULL;
    int err = 0;
    for (Py_ssize_t i = 0; i < maxp;) {
        if (tun_spare && PyBytes_GET_SIZE(tun_spare) != size)
            Py_CLEAR(tun_spare);
        if (!tun_spare && !(tun_spare = PyBytes_FromStringAndSize(NULL, size)))
            goto fail;
        ssize_t n = read((int)fd, PyBytes_AS_STRING(tun_spare), (size_t)size);
        if (n < 0) {
            if (errno == EINTR) {
                if (PyErr_CheckSignals() < 0)
                    goto fail;
                continue;
            }
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                err = errno;
            break;
        }
        if (n == 0) /* nothing a TUN returns; never spin on it */
            break;
        PyObject *pkt = tun_spare;
        tun_spare = NULL;
        if (_PyBytes_Resize(&pkt, n) < 0) /* shrinks in place, as os.read does */
            goto fail;
        int rc = PyList_Append(pkts, pkt);
        Py_DECREF(pkt);
        if (rc < 0)
            goto fail;
        i++;
        budget -= n;
        if (budget <= 0)
            break;
    }
    return tuple_steal(2, pkts, PyLong_FromLong(err));
fail:
    Py_DECREF(pkts);
    return NULL;
}

/* write_tun(fd, writes) -> (written, failed, errno): one writev per list
 * of buffers in writes (Gro.flush's output), as tun.write_packets. */
static PyObject *k_write_tun(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "write_tun(fd, writes)");
        return NULL;
    }
    long fd = PyLong_AsLong(args[0]);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    PyObject *writes = args[1];
    if (!PyList_Check(writes)) {
        PyErr_SetString(PyExc_TypeError, "write_tun: writes must be a list");
        return NULL;
    }
    Py_ssize_t written = 0, failed = 0;
    int last = 0;
    for (Py_ssize_t w = 0; w < PyList_GET_SIZE(writes); w++) {
        PyObject *bufs = PyList_GET_ITEM(writes, w);
        PyObject *seq = PySequence_Fast(bufs, "write_tun: each write must be a sequence of buffers");
        if (!seq)
            return NULL;
        Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
        if (n > IOV_MAX || fd < 0 || fd > INT32_MAX) { /* as os.writev: the kernel refuses it */
            failed++;
            last = n > IOV_MAX ? EINVAL : EBADF;
            Py_DECREF(seq);
            continue;
        }
        Py_buffer views[IOV_MAX > 1024 ? 1024 : IOV_MAX];
        struct iovec iov[IOV_MAX > 1024 ? 1024 : IOV_MAX];
        Py_ssize_t got = 0;
        for (; got < n; got++) {
            if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, got), &views[got], PyBUF_SIMPLE) < 0)
                break;
            iov[got].iov_base = views[got].buf;
            iov[got].iov_len = (size_t)views[got].len;
        }
        int ok = got == n;
        if (ok) {
            ssize_t r;
            do
                r = writev((int)fd, iov, (int)n);
            while (r < 0 && errno == EINTR && PyErr_CheckSignals() == 0);
            if (r >= 0)
                written++;
            else if (!PyErr_Occurred()) {
                failed++;
                last = errno;
            } else
                ok = 0;
        }
        for (Py_ssize_t i = 0; i < got; i++)
            PyBuffer_Release(&views[i]);
        Py_DECREF(seq);
        if (!ok)
            return NULL;
    }
    return tuple_steal(3, PyLong_FromSsize_t(written), PyLong_FromSsize_t(failed), PyLong_FromLong(last));
}

#define RING_DATA_AT 4096
#define RING_TAIL_AT 64
#define RECORD_FIXED 22 /* "=QQIBB": generation, start, length, len(name), len(tag) */

/* One record into a ring and its announcement (common/shmring.py
 * RingWriter.put + common/datapath.py DataOut.send): the parts are copied
 * back to back at the record's start. Returns 0 put and announced, 1 no
 * room, 2 the socket's backlog is full (EAGAIN), 3 the send failed
 * otherwise; *tail is the reader's word as accepted (a value outside
 * [tail, head] is torn or bogus and ignored), *start where the record went. */
static int ring_put_send(uint8_t *base, uint64_t usize, uint64_t head, uint64_t *tail, uint64_t generation, int fd,
                         const uint8_t *name, size_t name_len, const uint8_t *tag, size_t tag_len,
                         const Py_buffer *parts, Py_ssize_t nparts, uint64_t n, uint64_t *start) {
    uint64_t word;
    memcpy(&word, base + RING_TAIL_AT, 8); /* the reader's word, on its own cache line */
    if (*tail <= word && word <= head)
        *tail = word;
    uint64_t pos = head % usize;
    *start = pos + n <= usize ? head : head + (usize - pos);
    if (*start + n - *tail > usize)
        return 1;
    uint8_t *at = base + RING_DATA_AT + *start % usize;
    for (Py_ssize_t i = 0; i < nparts; i++) {
        memcpy(at, parts[i].buf, (size_t)parts[i].len);
        at += parts[i].len;
    }
    uint8_t record[RECORD_FIXED + 255 + 255];
    uint32_t len32 = (uint32_t)n;
    memcpy(record, &generation, 8);
    memcpy(record + 8, start, 8);
    memcpy(record + 16, &len32, 4);
    record[20] = (uint8_t)name_len;
    record[21] = (uint8_t)tag_len;
    memcpy(record + RECORD_FIXED, name, name_len);
    memcpy(record + RECORD_FIXED + name_len, tag, tag_len);
    for (;;) {
        if (send(fd, record, RECORD_FIXED + name_len + tag_len, MSG_DONTWAIT | MSG_NOSIGNAL) >= 0)
            return 0;
        if (errno == EINTR)
            continue;
        return (errno == EAGAIN || errno == EWOULDBLOCK) ? 2 : 3;
    }
}

/* ring_send(ring_map, size, head, tail, generation, fd, name, tag, data)
 *   -> (status, start, tail): ring_put_send for one buffer; on status 1-3
 * the caller's head stays where it was. */
static PyObject *k_ring_send(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "ring_send(ring_map, size, head, tail, generation, fd, name, tag, data)");
        return NULL;
    }
    Py_ssize_t size = PyLong_AsSsize_t(args[1]);
    unsigned long long head = PyLong_AsUnsignedLongLong(args[2]), tail = PyLong_AsUnsignedLongLong(args[3]);
    unsigned long long generation = PyLong_AsUnsignedLongLong(args[4]);
    long fd = PyLong_AsLong(args[5]);
    if (PyErr_Occurred())
        return NULL;
    Py_buffer map, name, tag, data;
    if (PyObject_GetBuffer(args[0], &map, PyBUF_WRITABLE) < 0)
        return NULL;
    PyObject *ret = NULL;
    int have_name = 0, have_tag = 0, have_data = 0;
    if (PyObject_GetBuffer(args[6], &name, PyBUF_SIMPLE) < 0)
        goto done;
    have_name = 1;
    if (PyObject_GetBuffer(args[7], &tag, PyBUF_SIMPLE) < 0)
        goto done;
    have_tag = 1;
    if (PyObject_GetBuffer(args[8], &data, PyBUF_SIMPLE) < 0)
        goto done;
    have_data = 1;
    if (size <= 0 || map.len < RING_DATA_AT + size || fd < 0 || fd > INT32_MAX || name.len > 255 || tag.len > 255 ||
        data.len <= 0 || data.len > size / 2 || head < tail) {
        PyErr_SetString(PyExc_ValueError, "ring_send: arguments out of range");
        goto done;
    }
    uint64_t t = tail, start = 0;
    int status = ring_put_send(map.buf, (uint64_t)size, head, &t, generation, (int)fd, name.buf, (size_t)name.len,
                               tag.buf, (size_t)tag.len, &data, 1, (uint64_t)data.len, &start);
    ret = tuple_steal(3, PyLong_FromLong(status), PyLong_FromUnsignedLongLong(start), PyLong_FromUnsignedLongLong(t));
done:
    if (have_data)
        PyBuffer_Release(&data);
    if (have_tag)
        PyBuffer_Release(&tag);
    if (have_name)
        PyBuffer_Release(&name);
    PyBuffer_Release(&map);
    return ret;
}

static int attr_u64(PyObject *obj, int idx, PyObject *name, uint64_t *v) { /* a ring's integer field */
    PyObject *o = field(obj, &RingType, idx, name);
    if (!o)
        return -1;
    *v = PyLong_AsUnsignedLongLong(o);
    Py_DECREF(o);
    return PyErr_Occurred() ? -1 : 0;
}

/* RingWriter.advance (common/shmring.py, the reference) on a RingFields
 * ring's slots, as it is the last step of every hand-over: the record of
 * n bytes at start is in and ends at the new head; for any other ring, its
 * method. */
static int ring_advance(PyObject *ring, uint64_t start, uint64_t n) {
    if (!PyObject_TypeCheck(ring, &RingType)) {
        PyObject *a = PyLong_FromUnsignedLongLong(start), *b = a ? PyLong_FromUnsignedLongLong(n) : NULL;
        PyObject *r = b ? PyObject_CallMethodObjArgs(ring, N_advance, a, b, NULL) : NULL;
        Py_XDECREF(a);
        Py_XDECREF(b);
        Py_XDECREF(r);
        return r ? 0 : -1;
    }
    PyObject **f = ((Fields *)ring)->f;
    PyObject *head = PyLong_FromUnsignedLongLong(start + n);
    if (!head)
        return -1;
    Py_XSETREF(f[RF_full_since], Py_NewRef(FloatZero));
    Py_XSETREF(f[RF__undo], f[RF_head] ? f[RF_head] : PyLong_FromLong(0)); /* the old head's reference moves */
    f[RF_head] = head;
    return 0;
}

/* Buffers into a DataOut's ring as one record with ``tag``, announced
 * (DataOut.put_and_announce in C): 1 handed over, 0 left for the caller's
 * slow path (not connected, no room, too big, the announcement failed:
 * DataOut.send retries, reconnects and counts), -1 an exception. */
static int put_parts(PyObject *data_out, const char *tag, Py_ssize_t tag_len, const Py_buffer *bufs,
                     Py_ssize_t nparts, uint64_t total, Py_ssize_t max_batch) {
    PyObject *fdo = NULL, *ring = NULL, *map = NULL, *name = NULL;
    Py_buffer mapbuf, namebuf;
    int have_map = 0, have_name = 0, rc = -1;
    long fd;
    uint64_t size, head, tail, generation;
    if (tag_len > 255)
        return 0;
    if (!(fdo = OUT(data_out, fd)))
        goto done;
    fd = PyLong_AsLong(fdo);
    if (fd == -1 && PyErr_Occurred())
        goto done;
    rc = 0;
    if (fd < 0 || fd > INT32_MAX || nparts == 0)
        goto done; /* not connected: DataOut.send reconnects and counts */
    rc = -1;
    if (!(ring = OUT(data_out, ring)) || !(map = RING(ring, map)) ||
        !(name = OUT(data_out, name_bytes)) || attr_u64(ring, RF_size, N_size, &size) < 0 ||
        attr_u64(ring, RF_head, N_head, &head) < 0 || attr_u64(ring, RF_tail, N_tail, &tail) < 0 ||
        attr_u64(ring, RF_generation, N_generation, &generation) < 0)
        goto done;
    if (PyObject_GetBuffer(map, &mapbuf, PyBUF_WRITABLE) < 0)
        goto done;
    have_map = 1;
    if (PyObject_GetBuffer(name, &namebuf, PyBUF_SIMPLE) < 0)
        goto done;
    have_name = 1;
    rc = 0;
    if (size == 0 || (uint64_t)mapbuf.len < RING_DATA_AT + size || namebuf.len > 255 || head < tail || total == 0 ||
        total > (uint64_t)max_batch || total > size / 2)
        goto done; /* too big for one record, or nothing: the caller cuts or drops it */
    uint64_t start = 0, t = tail;
    int status = ring_put_send(mapbuf.buf, size, head, &t, generation, (int)fd, namebuf.buf, (size_t)namebuf.len,
                               (const uint8_t *)tag, (size_t)tag_len, bufs, nparts, total, &start);
    rc = -1;
    PyObject *tv = PyLong_FromUnsignedLongLong(t);
    if (!tv || set_field(ring, &RingType, RF_tail, N_tail, tv) < 0) {
        Py_XDECREF(tv);
        goto done;
    }
    Py_DECREF(tv);
    if (status == 0 && ring_advance(ring, start, total) < 0)
        goto done;
    rc = status == 0;
done:
    if (have_name)
        PyBuffer_Release(&namebuf);
    if (have_map)
        PyBuffer_Release(&mapbuf);
    Py_XDECREF(fdo);
    Py_XDECREF(ring);
    Py_XDECREF(map);
    Py_XDECREF(name);
    return rc;
}

/* One next hop's packets (a list of buffers) to its ring, as hand_over:
 * 1 handed over, 0 left for the caller's slow path, -1 an exception. */
static int hand_over_one(PyObject *hop, PyObject *parts, PyObject *data_out, Py_ssize_t max_batch) {
    Py_ssize_t tag_len;
    const char *tag = PyUnicode_AsUTF8AndSize(hop, &tag_len);
    if (!tag)
        return -1;
    if (tag_len > 255 || !PyList_Check(parts))
        return 0;
    Py_ssize_t nparts = PyList_GET_SIZE(parts), got = 0;
    if (nparts == 0)
        return 0;
    Py_buffer *bufs = PyMem_Calloc((size_t)nparts, sizeof *bufs);
    if (!bufs) {
        PyErr_NoMemory();
        return -1;
    }
    uint64_t total = 0;
    int rc = -1;
    for (; got < nparts; got++) {
        if (PyObject_GetBuffer(PyList_GET_ITEM(parts, got), &bufs[got], PyBUF_SIMPLE) < 0)
            goto done;
        total += (uint64_t)bufs[got].len;
    }
    rc = put_parts(data_out, tag, tag_len, bufs, nparts, total, max_batch);
done:
    for (Py_ssize_t i = 0; i < got; i++)
        PyBuffer_Release(&bufs[i]);
    PyMem_Free(bufs);
    return rc;
}

/* link_rx(fd, buf, have, own_prefix, data_out, max_batch) -> (n, end, runs):
 * services/peerd/local_batch.py link_rx in C. One read from a link's
 * stream socket into buf[have:]; then the data packets at the start of
 * the buffer that are whole, for own_prefix (/64) and forwardable (hop
 * limit >= 2) go to tund's ring in one record, their hop limits
 * decremented. n: bytes read (0 end of stream, -errno a failed read);
 * end: bytes handed over from the start of buf (0: none, buf as read);
 * runs: the packet statistics' runs of what went, as all_local's. */
static PyObject *k_link_rx(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "link_rx(fd, buf, have, own_prefix, data_out, max_batch)");
        return NULL;
    }
    long fd = PyLong_AsLong(args[0]);
    Py_ssize_t have = PyLong_AsSsize_t(args[2]), max_batch = PyLong_AsSsize_t(args[5]);
    if (PyErr_Occurred())
        return NULL;
    Py_buffer view, own;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_WRITABLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[3], &own, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    PyObject *ret = NULL, *runs = NULL;
    if (fd < 0 || fd > INT32_MAX || have < 0 || have > view.len || own.len != 8) {
        PyErr_SetString(PyExc_ValueError, "link_rx: arguments out of range");
        goto done;
    }
    uint8_t *b = view.buf;
    ssize_t n; /* a non-blocking socket: the GIL stays */
    do
        n = read((int)fd, b + have, (size_t)(view.len - have));
    while (n < 0 && errno == EINTR);
    if (n <= 0) {
        ret = tuple_steal(3, PyLong_FromSsize_t(n < 0 ? (Py_ssize_t)-errno : 0), PyLong_FromSsize_t(0), Py_NewRef(Py_None));
        goto done;
    }
    Py_ssize_t end = have + n, pos = 0;
    while (end - pos >= DATA_HDR && b[pos] == 1 && b[pos + 1] == 0) { /* version 1, a data packet */
        Py_ssize_t next = pos + DATA_HDR + rd16(b + pos + 5);
        if (next > end || b[pos + 7] < 2 || memcmp(b + pos + 24, own.buf, 8) != 0)
            break;
        pos = next;
    }
    if (pos == 0) {
        ret = tuple_steal(3, PyLong_FromSsize_t((Py_ssize_t)n), PyLong_FromSsize_t(0), Py_NewRef(Py_None));
        goto done;
    }
    for (Py_ssize_t o = 0; o < pos; o += DATA_HDR + rd16(b + o + 5))
        b[o + 7]--;
    Py_buffer part = view; /* the record: buf[:pos] */
    part.len = pos;
    int rc = put_parts(args[4], "", 0, &part, 1, (uint64_t)pos, max_batch);
    if (rc <= 0) { /* not handed over: the buffer goes back as it was read */
        for (Py_ssize_t o = 0; o < pos; o += DATA_HDR + rd16(b + o + 5))
            b[o + 7]++;
        if (rc == 0)
            ret = tuple_steal(3, PyLong_FromSsize_t((Py_ssize_t)n), PyLong_FromSsize_t(0), Py_NewRef(Py_None));
        goto done;
    }
    if (!(runs = PyList_New(0)))
        goto done;
    Py_ssize_t run_at = 0, run_n = 0;
    long long run_bytes = 0;
    for (Py_ssize_t o = 0; o < pos;) {
        Py_ssize_t body = rd16(b + o + 5), next = o + DATA_HDR + body;
        run_n++;
        run_bytes += body;
        if (next >= pos || memcmp(b + next + 8, b + o + 8, 32) != 0) { /* a run of one flow ends */
            if (append_run(runs, b + run_at + 8, run_n, run_bytes) < 0)
                goto done;
            run_at = next;
            run_n = 0;
            run_bytes = 0;
        }
        o = next;
    }
    ret = tuple_steal(3, PyLong_FromSsize_t((Py_ssize_t)n), PyLong_FromSsize_t(pos), Py_NewRef(runs));
done:
    Py_XDECREF(runs);
    PyBuffer_Release(&own);
    PyBuffer_Release(&view);
    return ret;
}

/* hand_over(out, rings, max_batch) -> handed: as datapath.hand_over. */
static PyObject *k_hand_over(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "hand_over(out, rings, max_batch)");
        return NULL;
    }
    PyObject *out = args[0], *rings = args[1];
    Py_ssize_t max_batch = PyLong_AsSsize_t(args[2]);
    if (max_batch == -1 && PyErr_Occurred())
        return NULL;
    if (!PyDict_Check(out) || !PyDict_Check(rings)) {
        PyErr_SetString(PyExc_TypeError, "hand_over: out and rings must be dicts");
        return NULL;
    }
    PyObject *items = PyDict_Items(out); /* a snapshot: handed hops are deleted below */
    if (!items)
        return NULL;
    Py_ssize_t handed = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(items); i++) {
        PyObject *hop = PyTuple_GET_ITEM(PyList_GET_ITEM(items, i), 0);
        PyObject *parts = PyTuple_GET_ITEM(PyList_GET_ITEM(items, i), 1);
        if (!PyUnicode_Check(hop))
            continue;
        Py_ssize_t dash = PyUnicode_FindChar(hop, '-', 0, PyUnicode_GET_LENGTH(hop), 1);
        if (dash == -2)
            goto fail;
        PyObject *family = dash < 0 ? Py_NewRef(hop) : PyUnicode_Substring(hop, 0, dash);
        if (!family)
            goto fail;
        PyObject *data_out = PyDict_GetItemWithError(rings, family); /* borrowed */
        Py_DECREF(family);
        if (!data_out) {
            if (PyErr_Occurred())
                goto fail;
            continue;
        }
        if (data_out == Py_None)
            continue;
        int rc = hand_over_one(hop, parts, data_out, max_batch);
        if (rc < 0)
            goto fail;
        if (rc) {
            if (PyDict_DelItem(out, hop) < 0)
                goto fail;
            handed++;
        }
    }
    Py_DECREF(items);
    return PyLong_FromSsize_t(handed);
fail:
    Py_DECREF(items);
    return NULL;
}

/* One SEQPACKET record from a non-blocking fd into buf: its length, or 0
 * when there is none to take (*state: 0 drained, -1 the producer went
 * away, else errno), or -1 with an exception (a signal handler raised). */
static ssize_t recv_record(int fd, uint8_t *buf, size_t size, int *state) {
    for (;;) {
        ssize_t n = recv(fd, buf, size, MSG_DONTWAIT);
        if (n > 0)
            return n;
        if (n == 0) {
            *state = -1;
            return 0;
        }
        if (errno == EINTR) {
            if (PyErr_CheckSignals() < 0)
                return -1;
            continue;
        }
        *state = (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : errno;
        return 0;
    }
}

/* A batch straight from a ring to a link's socket (DataIn.drain's
 * ``direct``, common/datapath.py write_direct in C): when the link's
 * SendQueue says it is idle (write_fd >= 0) the batch is written at once;
 * what the socket does not take goes to queue.keep (a copy, written by
 * the queue's loop), a failed write to queue.fail. 1 the queue took the
 * batch, 0 not idle (the caller's handler takes it), -1 an exception. */
static int direct_write(PyObject *q, const uint8_t *p, Py_ssize_t len) {
    PyObject *o = QUEUE(q, write_fd);
    if (!o)
        return -1;
    long wfd = PyLong_AsLong(o);
    Py_DECREF(o);
    if (wfd == -1 && PyErr_Occurred())
        return -1;
    if (wfd < 0 || wfd > INT32_MAX)
        return 0;
    ssize_t n;
    do
        n = write((int)wfd, p, (size_t)len);
    while (n < 0 && errno == EINTR);
    if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
        PyObject *why = PyUnicode_FromFormat("write error: [Errno %d] %s", errno, strerror(errno));
        PyObject *r = why ? PyObject_CallMethodOneArg(q, N_fail, why) : NULL;
        Py_XDECREF(why);
        if (!r)
            return -1;
        Py_DECREF(r);
        return 1;
    }
    Py_ssize_t sent = n < 0 ? 0 : (Py_ssize_t)n;
    if (sent) {
        PyObject *tx = QUEUE(q, tx_bytes), *add = NULL, *sum = NULL;
        if (tx && (add = PyLong_FromSsize_t(sent)))
            sum = PyNumber_Add(tx, add);
        int bad = !sum || set_field(q, &QueueType, QF_tx_bytes, N_tx_bytes, sum) < 0;
        Py_XDECREF(tx);
        Py_XDECREF(add);
        Py_XDECREF(sum);
        if (bad)
            return -1;
    }
    if (sent < len) {
        PyObject *rest = PyBytes_FromStringAndSize((const char *)p + sent, len - sent);
        PyObject *r = rest ? PyObject_CallMethodOneArg(q, N_keep, rest) : NULL;
        Py_XDECREF(rest);
        if (!r)
            return -1;
        Py_DECREF(r);
    }
    return 1;
}

/* drain_ring(fd, readers, handle, max_records, max_size, direct, min_direct)
 *   -> (left, state, n, direct_n):
 * DataIn.receive with the consumer's handle(tag, batch) called for each
 * record, while every record resolves to a ring already mapped: records
 * read from the SEQPACKET fd, each checked and resolved against readers
 * (ring name -> RingReader), handle called with a view of the record in
 * the ring (released after it returns), the reader's tail advanced past
 * it. The first record that needs Python (malformed, a ring or generation
 * not mapped yet, out of range: DataIn._resolve counts or opens it) is
 * returned as ``left`` and nothing after it is read; state as
 * datapath.recv_records; n records read. A record of at least min_direct
 * bytes whose tag is in direct (tag -> SendQueue) goes to direct_write
 * instead of the handler; direct_n counts those. */
static PyObject *k_drain_ring(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "drain_ring(fd, readers, handle, max_records, max_size, direct, min_direct)");
        return NULL;
    }
    long fd = PyLong_AsLong(args[0]);
    PyObject *readers = args[1], *handle = args[2], *direct = args[5];
    Py_ssize_t maxr = PyLong_AsSsize_t(args[3]), size = PyLong_AsSsize_t(args[4]);
    Py_ssize_t min_direct = PyLong_AsSsize_t(args[6]);
    if (PyErr_Occurred())
        return NULL;
    if (fd < 0 || fd > INT32_MAX || maxr < 0 || size <= 0 || size > 4096 || !PyDict_Check(readers) ||
        (direct != Py_None && !PyDict_Check(direct))) {
        PyErr_SetString(PyExc_ValueError, "drain_ring: fd, readers, max_records, max_size or direct out of range");
        return NULL;
    }
    uint8_t buf[4096];
    int state = 0;
    Py_ssize_t i = 0, direct_n = 0;
    PyObject *left = NULL;
    while (i < maxr) {
        ssize_t n = recv_record((int)fd, buf, (size_t)size, &state);
        if (n < 0)
            return NULL;
        if (n == 0)
            break;
        i++;
        uint64_t gen, start;
        uint32_t length;
        if (n < RECORD_FIXED)
            goto python;
        memcpy(&gen, buf, 8);
        memcpy(&start, buf + 8, 8);
        memcpy(&length, buf + 16, 4);
        size_t name_len = buf[20], tag_len = buf[21];
        if ((size_t)n != RECORD_FIXED + name_len + tag_len)
            goto python;
        PyObject *name = PyUnicode_DecodeUTF8((const char *)buf + RECORD_FIXED, (Py_ssize_t)name_len, NULL);
        if (!name) {
            PyErr_Clear();
            goto python;
        }
        PyObject *reader = PyDict_GetItemWithError(readers, name); /* borrowed */
        Py_DECREF(name);
        if (!reader) {
            if (PyErr_Occurred())
                return NULL;
            goto python;
        }
        uint64_t rgen, rsize;
        if (attr_u64(reader, RF_generation, N_generation, &rgen) < 0 || attr_u64(reader, RF_size, N_size, &rsize) < 0)
            return NULL;
        uint64_t pos = rsize ? start % rsize : 0;
        if (rgen != gen || rsize == 0 || length == 0 || start > INT64_MAX || pos + length > rsize)
            goto python;
        PyObject *map = RING(reader, map);
        if (!map)
            return NULL;
        if (map == Py_None) {
            Py_DECREF(map);
            goto python;
        }
        Py_buffer mb;
        if (PyObject_GetBuffer(map, &mb, PyBUF_WRITABLE) < 0) {
            Py_DECREF(map);
            return NULL;
        }
        if ((uint64_t)mb.len < RING_DATA_AT + rsize) {
            PyBuffer_Release(&mb);
            Py_DECREF(map);
            goto python;
        }
        Py_ssize_t at = (Py_ssize_t)(RING_DATA_AT + pos);
        PyObject *tag = PyBytes_FromStringAndSize((const char *)buf + RECORD_FIXED + name_len, (Py_ssize_t)tag_len);
        PyObject *whole = NULL, *view = NULL, *r = NULL;
        int taken = 0; /* 1: the link's queue took it straight from the ring (no view, no handler) */
        if (tag && direct != Py_None && (Py_ssize_t)length >= min_direct) {
            PyObject *q = PyDict_GetItemWithError(direct, tag); /* borrowed */
            if (q)
                taken = direct_write(q, (const uint8_t *)mb.buf + at, (Py_ssize_t)length);
            else if (PyErr_Occurred())
                taken = -1;
        }
        if (taken > 0) {
            direct_n++;
            r = Py_NewRef(Py_None);
        } else if (tag && taken == 0) {
            /* the batch as a view derived from the mapping (as RingReader.get's),
             * so the mapping cannot be closed under a view the handler kept */
            if ((whole = PyMemoryView_FromObject(map)))
                view = PySequence_GetSlice(whole, at, at + (Py_ssize_t)length);
            if (view)
                r = PyObject_CallFunctionObjArgs(handle, tag, view, NULL);
        }
        int failed = r == NULL;
        PyObject *et = NULL, *ev = NULL, *etb = NULL;
        if (failed)
            PyErr_Fetch(&et, &ev, &etb);
        Py_XDECREF(r);
        Py_XDECREF(tag);
        for (int k = 0; k < 2; k++) { /* released as DataIn.receive does; BufferError: the handler kept one */
            PyObject *v = k ? whole : view;
            if (!v)
                continue;
            PyObject *done = PyObject_CallMethodNoArgs(v, N_release);
            if (done)
                Py_DECREF(done);
            else
                PyErr_Clear();
            Py_DECREF(v);
        }
        { /* RingReader.release(generation, end): the record is consumed even if the handler failed */
            uint64_t end = start + length, word;
            if (attr_u64(reader, RF_generation, N_generation, &rgen) < 0) {
                if (failed)
                    PyErr_Clear();
                failed = 1;
            } else if (rgen == gen) {
                memcpy(&word, (uint8_t *)mb.buf + RING_TAIL_AT, 8);
                if (end > word)
                    memcpy((uint8_t *)mb.buf + RING_TAIL_AT, &end, 8);
            }
        }
        PyBuffer_Release(&mb);
        Py_DECREF(map);
        if (failed) {
            if (et)
                PyErr_Restore(et, ev, etb);
            else if (!PyErr_Occurred())
                PyErr_SetString(PyExc_RuntimeError, "drain_ring: the ring's generation could not be read");
            return NULL;
        }
        continue;
    python:
        if (!(left = PyBytes_FromStringAndSize((const char *)buf, n)))
            return NULL;
        break;
    }
    if (!left)
        left = Py_NewRef(Py_None);
    return tuple_steal(4, left, PyLong_FromLong(state), PyLong_FromSsize_t(i), PyLong_FromSsize_t(direct_n));
}

/* --- tund's wait and its common wake-ups ---------------------------------------------
 *
 * tund_wait(epfd, timeout, tun_fd, device_fd, conns, readers, data_in, dp, rings,
 *           max_batch, read_batch, read_budget, read_size) -> (ready, dirty, tun_errno)
 *
 * Why: with the per-packet work in C, most of an idle ping's time in tund
 * was the interpreter around it (perf over lone pings: libpython ~60 % of
 * tund's samples, _PyEval_EvalFrameDefault first), each Python step cold
 * after the idle spell. Here the wait and the two wake-ups a ping makes,
 * the TUN readable and a ring record from peerd, run without a Python
 * frame; the reference is services/tund/service.py TundWorker.run
 * (read_tun, read_data, flush), which handles everything else.
 *
 * Waits on epfd (tund's Epoller) up to timeout seconds. A wake-up whose
 * descriptors are all tun_fd or producer connections in conns is handled
 * here: a TUN burst read and sealed (read_tun, from_tun), the records on a
 * connection drained to from_peer (drain_ring; what needs Python, as a
 * record to resolve or a closed connection, goes to data_in.drain_after),
 * then the flush: each next hop's batch to its ring (hand_over), the GRO
 * writes to device_fd (counted as tun_tx / tun_write_error). Then it waits
 * again. It returns when Python must act: ready (the descriptors of a
 * wake-up it did not handle, for the caller's usual dispatch), dirty (the
 * flush left work: batches that could not go, messages, route requests,
 * sessions to sync; the caller runs its flush), tun_errno (a failed TUN
 * read, for the caller to count and log); ([], False, 0) at the timeout. */

static PyObject *k_from_tun(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);
static PyObject *k_from_peer(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);
static PyObject *k_read_tun(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);
static PyObject *k_write_tun(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);
static PyObject *k_hand_over(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);
static PyObject *k_drain_ring(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);

/* -1 error, 0 no, 1 yes: may the common path run now (DataPlane.from_tun and
 * from_peer would take the kernel's way, with no session changes to sync first)? */
static int tund_fast_ok(PyObject *dp) {
    PyObject *sessions = PLANE(dp, sessions), *fw = NULL;
    if (!sessions)
        return -1;
    int ok = 1;
    if (sessions != Py_None) {
        PyObject *changed = PyObject_GetAttr(sessions, N_changed), *outbox = NULL;
        int c = changed ? PyObject_IsTrue(changed) : -1;
        Py_XDECREF(changed);
        if (c == 0 && (outbox = PyObject_GetAttr(sessions, N_outbox)))
            c = PyObject_IsTrue(outbox);
        else if (c == 0)
            c = -1;
        Py_XDECREF(outbox);
        ok = c < 0 ? -1 : !c;
    }
    Py_DECREF(sessions);
    if (ok != 1)
        return ok;
    if (!(fw = PLANE(dp, firewall)))
        return -1;
    if (fw != Py_None) { /* DataPlane.from_peer: the kernel's way only with the rules compiled for it */
        PyObject *rules = PyObject_GetAttr(fw, N_native);
        ok = rules ? rules != Py_None : -1;
        Py_XDECREF(rules);
    }
    Py_DECREF(fw);
    if (ok != 1)
        return ok;
    PyObject *gro = PLANE(dp, gro);
    if (!gro)
        return -1;
    ok = Py_TYPE(gro) == &GroType;
    Py_DECREF(gro);
    return ok;
}

/* drain_ring's handler: (dp, now) bound; DataPlane.from_peer's kernel way */
static PyObject *tund_from_peer(PyObject *bound, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "handler(tag, batch)");
        return NULL;
    }
    PyObject *dp = PyTuple_GET_ITEM(bound, 0);
    PyObject *a[3] = {dp, args[1], PyTuple_GET_ITEM(bound, 1)};
    PyObject *r = k_from_peer(NULL, a, 3);
    if (!r)
        return NULL;
    Py_DECREF(r);
    PyObject *sessions = PLANE(dp, sessions);
    if (!sessions)
        return NULL;
    int sync = 0;
    if (sessions != Py_None) { /* as DataPlane.from_peer: the engine's changes before the next batch */
        PyObject *changed = PyObject_GetAttr(sessions, N_changed);
        sync = changed ? PyObject_IsTrue(changed) : -1;
        Py_XDECREF(changed);
    }
    Py_DECREF(sessions);
    if (sync < 0)
        return NULL;
    if (sync && !(r = PyObject_CallMethodNoArgs(dp, N_sync_sessions)))
        return NULL;
    if (sync)
        Py_DECREF(r);
    Py_RETURN_NONE;
}

static PyMethodDef tund_from_peer_def = {"from_peer_batch", (PyCFunction)(void (*)(void))tund_from_peer,
                                         METH_FASTCALL, "DataPlane.from_peer(batch, now) for drain_ring"};

/* TundWorker.flush's common part: 0 done, 1 dirty (the caller's flush has work), -1 error */
static int tund_flush(PyObject *dp, PyObject *rings, PyObject *max_batch, PyObject *device_fd) {
    int ok = tund_fast_ok(dp); /* the engine changed or queued handshakes while opening: the caller's flush, in its order */
    if (ok <= 0)
        return ok < 0 ? -1 : 1;
    int dirty = 0;
    PyObject *out = PLANE(dp, out);
    if (!out)
        return -1;
    if (PyDict_Check(out) && PyDict_GET_SIZE(out)) {
        PyObject *a[3] = {out, rings, max_batch};
        PyObject *r = k_hand_over(NULL, a, 3);
        if (!r) {
            Py_DECREF(out);
            return -1;
        }
        Py_DECREF(r);
        dirty |= PyDict_GET_SIZE(out) != 0; /* cut, retried, counted or sent over the bus by the caller */
    } else if (!PyDict_Check(out)) {
        dirty = 1;
    }
    Py_DECREF(out);
    PyObject *gro = PLANE(dp, gro);
    if (!gro)
        return -1;
    PyObject *writes = gro_flush((Gro *)gro, NULL);
    Py_DECREF(gro);
    if (!writes)
        return -1;
    if (PyList_GET_SIZE(writes)) {
        PyObject *a[2] = {device_fd, writes};
        PyObject *r = k_write_tun(NULL, a, 2);
        Py_DECREF(writes);
        if (!r)
            return -1;
        Count c[2] = {{"+tun_tx", PyLong_AsLongLong(PyTuple_GET_ITEM(r, 0))},
                      {"tun_write_error", PyLong_AsLongLong(PyTuple_GET_ITEM(r, 1))}};
        Py_DECREF(r);
        PyObject *counters = PLANE(dp, counters);
        int bad = !counters || bump(counters, c, 2) < 0;
        Py_XDECREF(counters);
        if (bad)
            return -1;
    } else {
        Py_DECREF(writes);
    }
    PyObject *messages = PLANE(dp, messages), *need = messages ? PyObject_GetAttr(dp, N_need) : NULL;
    if (need) {
        int m = PyObject_IsTrue(messages), n = PyObject_IsTrue(need);
        if (m < 0 || n < 0)
            dirty = -1;
        else if (dirty >= 0)
            dirty |= m || n;
    } else {
        dirty = -1;
    }
    Py_XDECREF(messages);
    Py_XDECREF(need);
    return dirty;
}

static unsigned long long tund_handled; /* wake-ups tund_wait handled itself */
static unsigned long long data_handled; /* wake-ups data_wait handled itself */

static PyObject *k_tund_handled(PyObject *mod, PyObject *unused) { return PyLong_FromUnsignedLongLong(tund_handled); }

static double mono_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* time.monotonic's clock */
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

#define TUND_EVENTS 64
#define TUND_READ_BURST 512 /* common/datapath.py READ_BURST */
#define TUND_MAX_RECORD (RECORD_FIXED + 255 + 255) /* common/datapath.py MAX_RECORD */

/* One epoll_wait until deadline (seconds on mono_now's clock; < 0: none):
 * the events' count, 0 at the deadline, -1 with an exception, -2 when a
 * signal interrupted it and its handler returned (the caller decides). */
static int wait_events(long epfd, double deadline, struct epoll_event *evs) {
    int ms = -1;
    if (deadline >= 0) {
        double left_s = deadline - mono_now();
        ms = left_s <= 0 ? 0 : (int)(left_s * 1000.0) + 1; /* at least until the deadline, as EpollSelector */
    }
    int n, err;
    Py_BEGIN_ALLOW_THREADS
    n = epoll_wait((int)epfd, evs, TUND_EVENTS, ms);
    err = errno;
    Py_END_ALLOW_THREADS
    if (n >= 0)
        return n;
    if (err != EINTR) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return PyErr_CheckSignals() < 0 ? -1 : -2;
}

/* DataIn.drain on a producer connection, its first burst in C: drain_ring,
 * then data_in.drain_after for a record that needs Python or an ended
 * connection. *went += the batches written straight to a link. 0, or -1
 * with an exception. */
static int drain_conn(int fd, PyObject *readers, PyObject *handle, PyObject *direct, PyObject *min_direct,
                      PyObject *data_in, long long *went) {
    PyObject *fdo = PyLong_FromLong(fd);
    PyObject *burst = fdo ? PyLong_FromLong(TUND_READ_BURST) : NULL;
    PyObject *size = burst ? PyLong_FromLong(TUND_MAX_RECORD) : NULL;
    PyObject *r = NULL;
    if (size) {
        PyObject *a[7] = {fdo, readers, handle, burst, size, direct, min_direct};
        r = k_drain_ring(NULL, a, 7);
    }
    int rc = r ? 0 : -1;
    if (r) {
        PyObject *left = PyTuple_GET_ITEM(r, 0);
        long state = PyLong_AsLong(PyTuple_GET_ITEM(r, 1));
        Py_ssize_t got = PyLong_AsSsize_t(PyTuple_GET_ITEM(r, 2));
        *went += PyLong_AsLongLong(PyTuple_GET_ITEM(r, 3));
        if (left != Py_None || state != 0) { /* a record to resolve, or the connection ended */
            PyObject *budget = PyLong_FromSsize_t(TUND_READ_BURST - got);
            PyObject *st = budget ? PyLong_FromLong(state) : NULL;
            PyObject *res = st ? PyObject_CallMethodObjArgs(data_in, N_drain_after, fdo, handle, left, st, budget,
                                                            direct, min_direct, NULL)
                               : NULL;
            if (res)
                *went += PyLong_AsLongLong(res);
            else
                rc = -1;
            Py_XDECREF(res);
            Py_XDECREF(budget);
            Py_XDECREF(st);
        }
        Py_DECREF(r);
    }
    Py_XDECREF(fdo);
    Py_XDECREF(burst);
    Py_XDECREF(size);
    return rc;
}

static PyObject *k_tund_wait(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 13) {
        PyErr_SetString(PyExc_TypeError, "tund_wait(epfd, timeout, tun_fd, device_fd, conns, readers, data_in, dp, "
                                         "rings, max_batch, read_batch, read_budget, read_size)");
        return NULL;
    }
    long epfd = PyLong_AsLong(args[0]), tun_fd = PyLong_AsLong(args[2]);
    double timeout = PyFloat_AsDouble(args[1]);
    if (PyErr_Occurred())
        return NULL;
    PyObject *conns = args[4], *readers = args[5], *data_in = args[6], *dp = args[7], *rings = args[8];
    if (epfd < 0 || epfd > INT32_MAX || !PyDict_Check(conns) || !PyDict_Check(readers) || !PyDict_Check(rings)) {
        PyErr_SetString(PyExc_ValueError, "tund_wait: epfd, conns, readers or rings out of range");
        return NULL;
    }
    double deadline = mono_now() + (timeout > 0 ? timeout : 0);
    int dirty = 0;
    long tun_err = 0;
    struct epoll_event evs[TUND_EVENTS];
    for (;;) {
        int n = wait_events(epfd, deadline, evs);
        if (n == -1)
            return NULL;
        if (n == -2)
            continue; /* a handler that stops the loop wrote to its descriptor: the next wait returns it */
        if (n == 0)
            return tuple_steal(3, PyList_New(0), PyBool_FromLong(dirty), PyLong_FromLong(tun_err));
        int fast = 1;
        for (int i = 0; i < n && fast; i++) {
            int fd = evs[i].data.fd;
            if (fd == tun_fd && tun_fd >= 0)
                continue;
            PyObject *key = PyLong_FromLong(fd);
            int in = key ? PyDict_Contains(conns, key) : -1;
            Py_XDECREF(key);
            if (in < 0)
                return NULL;
            fast = in;
        }
        if (fast) {
            int ok = tund_fast_ok(dp);
            if (ok < 0)
                return NULL;
            fast = ok;
        }
        if (!fast || dirty || tun_err) { /* the caller's dispatch, as its own poll would have returned them */
            PyObject *ready = PyList_New(n);
            if (!ready)
                return NULL;
            for (int i = 0; i < n; i++) {
                PyObject *fd = PyLong_FromLong(evs[i].data.fd);
                if (!fd) {
                    Py_DECREF(ready);
                    return NULL;
                }
                PyList_SET_ITEM(ready, i, fd);
            }
            return tuple_steal(3, ready, PyBool_FromLong(dirty), PyLong_FromLong(tun_err));
        }
        PyObject *now = PyFloat_FromDouble(mono_now());
        if (!now)
            return NULL;
        int failed = 0;
        for (int i = 0; i < n && !failed; i++) {
            int fd = evs[i].data.fd;
            if (fd == tun_fd) { /* TundWorker.read_tun */
                PyObject *a[4] = {args[2], args[10], args[11], args[12]};
                PyObject *r = k_read_tun(NULL, a, 4);
                if (!r) {
                    failed = 1;
                    break;
                }
                PyObject *pkts = PyTuple_GET_ITEM(r, 0);
                tun_err = PyLong_AsLong(PyTuple_GET_ITEM(r, 1));
                if (PyList_GET_SIZE(pkts)) {
                    PyObject *off = PLANE(dp, off);
                    PyObject *b[4] = {dp, pkts, now, off};
                    PyObject *res = off ? k_from_tun(NULL, b, 4) : NULL;
                    Py_XDECREF(off);
                    if (!res)
                        failed = 1;
                    Py_XDECREF(res);
                }
                Py_DECREF(r);
                continue;
            }
            /* TundWorker.read_data: DataIn.drain's first burst here, the rest in Python */
            PyObject *bound = PyTuple_Pack(2, dp, now);
            PyObject *handle = bound ? PyCFunction_New(&tund_from_peer_def, bound) : NULL;
            PyObject *one = handle ? PyLong_FromLong(1) : NULL;
            long long went = 0;
            if (!one || drain_conn(fd, readers, handle, Py_None, one, data_in, &went) < 0)
                failed = 1;
            Py_XDECREF(bound);
            Py_XDECREF(handle);
            Py_XDECREF(one);
        }
        Py_DECREF(now);
        if (failed)
            return NULL;
        int d = tund_flush(dp, rings, args[9], args[3]); /* TundWorker.flush */
        if (d < 0)
            return NULL;
        dirty = d;
        tund_handled++;
        if (dirty || tun_err || mono_now() >= deadline) /* under steady traffic too, the caller's timers run on time */
            return tuple_steal(3, PyList_New(0), PyBool_FromLong(dirty), PyLong_FromLong(tun_err));
    }
}

/* data_wait(epfd, timeout, conns, readers, handle, direct, min_direct, data_in, counters, ready_queue,
 *           first, fd_to_key, counts, on_error) -> [(fd, epoll mask), ...]
 *
 * peerd's wait (services/peerd/eventloop.py DataFirstSelector) with the
 * wake-ups of the ring connections from tund in C: when every descriptor a
 * wait returns is one of conns (DataIn's producer connections) and only
 * readable, their records are drained as PeerdService.read_data does
 * (drain_ring with the links' send queues in direct; what needs Python to
 * data_in.drain_after; data_out_batches counted); a descriptor with a
 * data-first reader (first, checked against asyncio's handle in fd_to_key
 * as the selector does; a link's socket) has it called from here, counted
 * in counts["ran_first"], its failures to on_error(reader, exc). Then it
 * waits again. It
 * returns the events of any other wake-up unhandled, for the selector's
 * usual dispatch; [] at the timeout (None: none), after EINTR, or as soon
 * as a handled wake-up left callbacks on asyncio's ready queue (a send
 * queue's write loop woken), so the loop runs them at once. */
/* 1 when fd's data-first reader (first: fd -> (asyncio handle, reader)) is
 * still the one asyncio holds (fd_to_key: the selector's keys; key.data is
 * asyncio's (reader handle, writer handle)), 0 not, -1 error; *reader set */
static int first_reader(PyObject *first, PyObject *fd_to_key, PyObject *fdo, PyObject **reader) {
    PyObject *entry = PyDict_GetItemWithError(first, fdo); /* borrowed */
    if (!entry)
        return PyErr_Occurred() ? -1 : 0;
    PyObject *key = PyDict_GetItemWithError(fd_to_key, fdo);
    if (!key)
        return PyErr_Occurred() ? -1 : 0;
    if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 2 || !PyTuple_Check(key) || PyTuple_GET_SIZE(key) < 4)
        return 0;
    PyObject *data = PyTuple_GET_ITEM(key, 3); /* SelectorKey(fileobj, fd, events, data) */
    if (!PyTuple_Check(data) || PyTuple_GET_SIZE(data) < 1 || PyTuple_GET_ITEM(data, 0) != PyTuple_GET_ITEM(entry, 0))
        return 0;
    *reader = PyTuple_GET_ITEM(entry, 1);
    return 1;
}

static PyObject *k_data_wait(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 14) {
        PyErr_SetString(PyExc_TypeError, "data_wait(epfd, timeout, conns, readers, handle, direct, min_direct, "
                                         "data_in, counters, ready_queue, first, fd_to_key, counts, on_error)");
        return NULL;
    }
    PyObject *first = args[10], *fd_to_key = args[11], *counts = args[12], *on_error = args[13];
    if (!PyDict_Check(first) || !PyDict_Check(fd_to_key) || !PyDict_Check(counts)) {
        PyErr_SetString(PyExc_TypeError, "data_wait: first, fd_to_key and counts must be dicts");
        return NULL;
    }
    long epfd = PyLong_AsLong(args[0]);
    if (epfd == -1 && PyErr_Occurred())
        return NULL;
    double timeout = -1;
    if (args[1] != Py_None && (timeout = PyFloat_AsDouble(args[1])) == -1 && PyErr_Occurred())
        return NULL;
    PyObject *conns = args[2], *readers = args[3], *handle = args[4], *direct = args[5], *data_in = args[7];
    PyObject *counters = args[8], *ready_queue = args[9];
    if (epfd < 0 || epfd > INT32_MAX || !PyDict_Check(conns) || !PyDict_Check(readers) || !PyDict_Check(counters)) {
        PyErr_SetString(PyExc_ValueError, "data_wait: epfd, conns, readers or counters out of range");
        return NULL;
    }
    double deadline = timeout < 0 ? 0 : mono_now() + timeout;
    struct epoll_event evs[TUND_EVENTS];
    for (;;) {
        int n = wait_events(epfd, timeout < 0 ? -1 : deadline, evs);
        if (n == -1)
            return NULL;
        if (n == -2)
            return PyList_New(0); /* as EpollSelector: the loop runs the signal's callbacks */
        int fast = n > 0;
        PyObject *readers_of[TUND_EVENTS]; /* borrowed: the data-first reader of each event, NULL for a ring */
        for (int i = 0; i < n && fast; i++) {
            readers_of[i] = NULL;
            if (evs[i].events != EPOLLIN) {
                fast = 0;
                break;
            }
            PyObject *key = PyLong_FromLong(evs[i].data.fd);
            int in = key ? PyDict_Contains(conns, key) : -1;
            if (in == 0) /* not a ring: a data-first reader (a link's socket) is called from here too */
                in = first_reader(first, fd_to_key, key, &readers_of[i]);
            Py_XDECREF(key);
            if (in < 0)
                return NULL;
            fast = in;
        }
        if (!fast) {
            PyObject *ready = PyList_New(n);
            if (!ready)
                return NULL;
            for (int i = 0; i < n; i++) {
                PyObject *t = tuple_steal(2, PyLong_FromLong(evs[i].data.fd), PyLong_FromUnsignedLong(evs[i].events));
                if (!t) {
                    Py_DECREF(ready);
                    return NULL;
                }
                PyList_SET_ITEM(ready, i, t);
            }
            return ready;
        }
        long long went = 0, ran = 0;
        for (int i = 0; i < n; i++) { /* PeerdService.read_data, DataIn.drain */
            if (readers_of[i]) { /* as DataFirstSelector.select: asyncio's exception handler has its failures */
                PyObject *reader = Py_NewRef(readers_of[i]), *r = PyObject_CallNoArgs(reader);
                ran++;
                if (!r) {
                    if (!PyErr_ExceptionMatches(PyExc_Exception)) { /* KeyboardInterrupt, SystemExit: as asyncio */
                        Py_DECREF(reader);
                        return NULL;
                    }
                    PyObject *et, *ev, *tb;
                    PyErr_Fetch(&et, &ev, &tb);
                    PyErr_NormalizeException(&et, &ev, &tb);
                    if (tb && ev)
                        PyException_SetTraceback(ev, tb);
                    PyObject *res = ev ? PyObject_CallFunctionObjArgs(on_error, reader, ev, NULL) : NULL;
                    Py_XDECREF(et);
                    Py_XDECREF(ev);
                    Py_XDECREF(tb);
                    Py_DECREF(reader);
                    if (!res)
                        return NULL;
                    Py_DECREF(res);
                    continue;
                }
                Py_DECREF(r);
                Py_DECREF(reader);
                continue;
            }
            if (drain_conn(evs[i].data.fd, readers, handle, direct, args[6], data_in, &went) < 0)
                return NULL;
        }
        if (went) {
            Count c[1] = {{"data_out_batches", went}};
            if (bump(counters, c, 1) < 0)
                return NULL;
        }
        if (ran) {
            Count c[1] = {{"ran_first", ran}};
            if (bump(counts, c, 1) < 0)
                return NULL;
        }
        data_handled++;
        Py_ssize_t queued = PyObject_Length(ready_queue);
        if (queued < 0)
            return NULL;
        if (queued || (timeout >= 0 && mono_now() >= deadline)) /* asyncio's timers run on time under traffic too */
            return PyList_New(0);
    }
}

static PyObject *k_data_handled(PyObject *mod, PyObject *unused) { return PyLong_FromUnsignedLongLong(data_handled); }

static PyMethodDef k_methods[] = {
    {"configure", k_configure, METH_VARARGS, "configure(InvalidTag, os.urandom, SegmentError)"},
    {"split_tcp", k_split_tcp, METH_VARARGS, "split_tcp(super_packet, off) -> plaintexts (gso.split_tcp, L3 prefix)"},
    {"from_tun", (PyCFunction)(void (*)(void))k_from_tun, METH_FASTCALL, "from_tun(dp, pkts, now, off)"},
    {"from_peer", (PyCFunction)(void (*)(void))k_from_peer, METH_FASTCALL, "from_peer(dp, blob, now)"},
    {"read_tun", (PyCFunction)(void (*)(void))k_read_tun, METH_FASTCALL,
     "read_tun(fd, max_packets, budget, size) -> (packets, errno): as tun.read_packets"},
    {"write_tun", (PyCFunction)(void (*)(void))k_write_tun, METH_FASTCALL,
     "write_tun(fd, writes) -> (written, failed, errno): as tun.write_packets"},
    {"ring_send", (PyCFunction)(void (*)(void))k_ring_send, METH_FASTCALL,
     "ring_send(ring_map, size, head, tail, generation, fd, name, tag, data) -> (status, start, tail)"},
    {"hand_over", (PyCFunction)(void (*)(void))k_hand_over, METH_FASTCALL,
     "hand_over(out, rings, max_batch) -> handed: as datapath.hand_over"},
    {"drain_ring", (PyCFunction)(void (*)(void))k_drain_ring, METH_FASTCALL,
     "drain_ring(fd, readers, handle, max_records, max_size, direct, min_direct) -> (left, state, n, direct_n): "
     "as DataIn.drain"},
    {"link_rx", (PyCFunction)(void (*)(void))k_link_rx, METH_FASTCALL,
     "link_rx(fd, buf, have, own_prefix, data_out, max_batch) -> (n, end, runs): as local_batch.link_rx"},
    {"tund_wait", (PyCFunction)(void (*)(void))k_tund_wait, METH_FASTCALL,
     "tund_wait(epfd, timeout, tun_fd, device_fd, conns, readers, data_in, dp, rings, max_batch, read_batch, "
     "read_budget, read_size) -> (ready, dirty, tun_errno): tund's wait and its common wake-ups"},
    {"data_wait", (PyCFunction)(void (*)(void))k_data_wait, METH_FASTCALL,
     "data_wait(epfd, timeout, conns, readers, handle, direct, min_direct, data_in, counters, ready_queue, first, "
     "fd_to_key, counts, on_error) -> [(fd, mask)]: peerd's wait with its data-path wake-ups"},
    {"data_handled", k_data_handled, METH_NOARGS, "data_handled() -> wake-ups data_wait handled in this process"},
    {"tund_handled", k_tund_handled, METH_NOARGS, "tund_handled() -> wake-ups tund_wait handled in this process"},
    {"all_local", k_all_local, METH_VARARGS, "all_local(buf, offsets, own_prefix): as local_batch.all_local"},
    {NULL}};

static struct PyModuleDef k_module = {PyModuleDef_HEAD_INIT, "_kernel", "The data plane's per-packet kernel in C.",
                                      -1, k_methods};

PyMODINIT_FUNC PyInit__kernel(void) {
    if (PyType_Ready(&AeadType) < 0 || PyType_Ready(&GroType) < 0 || PyType_Ready(&WindowType) < 0 ||
        PyType_Ready(&FwRulesType) < 0 || PyType_Ready(&PlaneType) < 0 || PyType_Ready(&RingType) < 0 ||
        PyType_Ready(&OutType) < 0 || PyType_Ready(&QueueType) < 0)
        return NULL;
#define INTERN_NAME(n)                                                                                                 \
    if (!(N_##n = PyUnicode_InternFromString(#n)))                                                                     \
        return NULL;
    KERNEL_NAMES(INTERN_NAME)
    if (!(Four = PyLong_FromLong(4)) || !(FloatZero = PyFloat_FromDouble(0.0)))
        return NULL;
    gcm_setup();
    PyObject *m = PyModule_Create(&k_module);
    if (!m)
        return NULL;
    Py_INCREF(&AeadType);
    Py_INCREF(&GroType);
    Py_INCREF(&WindowType);
    Py_INCREF(&FwRulesType);
    if (PyModule_AddObject(m, "Aead", (PyObject *)&AeadType) < 0 ||
        PyModule_AddObject(m, "ReplayWindow", (PyObject *)&WindowType) < 0 ||
        PyModule_AddObject(m, "FirewallRules", (PyObject *)&FwRulesType) < 0 ||
        PyModule_AddObject(m, "Gro", (PyObject *)&GroType) < 0 ||
        PyModule_AddObjectRef(m, "PlaneFields", (PyObject *)&PlaneType) < 0 ||
        PyModule_AddObjectRef(m, "RingFields", (PyObject *)&RingType) < 0 ||
        PyModule_AddObjectRef(m, "OutFields", (PyObject *)&OutType) < 0 ||
        PyModule_AddObjectRef(m, "QueueFields", (PyObject *)&QueueType) < 0 ||
        PyModule_AddIntConstant(m, "GRO_MAX_OPEN", GRO_MAX_OPEN) < 0 ||
        PyModule_AddStringConstant(m, "GCM_BACKEND", gcm.newctx ? "provider" : "evp") < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
