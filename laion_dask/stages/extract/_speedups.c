/*
 * Compiled fast paths of WAT extraction (optional: laion_dask works without them, slower).
 *
 * Each function here has a pure-Python twin that defines its result; tests/test_speedups.py
 * checks that both give the same output on generated and real Common Crawl input. Anything
 * outside the common case (odd whitespace, dot segments, text that needs clean-up) is handed
 * back to the Python code, so only the plain, frequent cases are duplicated here:
 *
 *   img_pairs      the per-link loop of a WAT record (``_Collector.add_wat``)
 *   pair_hashes    LAION's join key, mmh3.hash64(url + text)[0], for many pairs
 *   record_hashes  mmh3.hash64(f"{source_file}\0{offset}", signed=False)[0] per record
 *   inflate_members  the gzip members of a buffer, inflated one by one (records.py's walk)
 *   record_bounds  the type and block of one plain WARC record (the member walk's check)
 *
 * MurmurHash3_x64_128 follows Austin Appleby's public-domain reference (little-endian reads).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* ---------------------------------------------------------------- MurmurHash3_x64_128 ---- */

static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t fmix64(uint64_t k) {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    k *= 0xc4ceb9fe1a85ec53ULL;
    k ^= k >> 33;
    return k;
}

static inline uint64_t load64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

/* The first 64-bit half (h1) of MurmurHash3_x64_128 with seed 0. */
static uint64_t murmur3_h1(const uint8_t *data, Py_ssize_t len) {
    const Py_ssize_t nblocks = len / 16;
    const uint64_t c1 = 0x87c37b91114253d5ULL, c2 = 0x4cf5ad432745937fULL;
    uint64_t h1 = 0, h2 = 0, k1, k2;
    for (Py_ssize_t i = 0; i < nblocks; i++) {
        k1 = load64(data + 16 * i);
        k2 = load64(data + 16 * i + 8);
        k1 *= c1; k1 = rotl64(k1, 31); k1 *= c2; h1 ^= k1;
        h1 = rotl64(h1, 27); h1 += h2; h1 = h1 * 5 + 0x52dce729;
        k2 *= c2; k2 = rotl64(k2, 33); k2 *= c1; h2 ^= k2;
        h2 = rotl64(h2, 31); h2 += h1; h2 = h2 * 5 + 0x38495ab5;
    }
    const uint8_t *tail = data + nblocks * 16;
    k1 = 0;
    k2 = 0;
    switch (len & 15) {
    case 15: k2 ^= (uint64_t)tail[14] << 48; /* fall through */
    case 14: k2 ^= (uint64_t)tail[13] << 40; /* fall through */
    case 13: k2 ^= (uint64_t)tail[12] << 32; /* fall through */
    case 12: k2 ^= (uint64_t)tail[11] << 24; /* fall through */
    case 11: k2 ^= (uint64_t)tail[10] << 16; /* fall through */
    case 10: k2 ^= (uint64_t)tail[9] << 8;   /* fall through */
    case 9:
        k2 ^= (uint64_t)tail[8];
        k2 *= c2; k2 = rotl64(k2, 33); k2 *= c1; h2 ^= k2;
        /* fall through */
    case 8: k1 ^= (uint64_t)tail[7] << 56; /* fall through */
    case 7: k1 ^= (uint64_t)tail[6] << 48; /* fall through */
    case 6: k1 ^= (uint64_t)tail[5] << 40; /* fall through */
    case 5: k1 ^= (uint64_t)tail[4] << 32; /* fall through */
    case 4: k1 ^= (uint64_t)tail[3] << 24; /* fall through */
    case 3: k1 ^= (uint64_t)tail[2] << 16; /* fall through */
    case 2: k1 ^= (uint64_t)tail[1] << 8;  /* fall through */
    case 1:
        k1 ^= (uint64_t)tail[0];
        k1 *= c1; k1 = rotl64(k1, 31); k1 *= c2; h1 ^= k1;
    }
    h1 ^= (uint64_t)len;
    h2 ^= (uint64_t)len;
    h1 += h2;
    h2 += h1;
    h1 = fmix64(h1);
    h2 = fmix64(h2);
    h1 += h2;
    return h1;
}

/* A growable byte buffer for concatenations. */
typedef struct {
    uint8_t *p;
    Py_ssize_t cap;
} Buf;

static int buf_reserve(Buf *b, Py_ssize_t n) {
    if (n <= b->cap)
        return 0;
    Py_ssize_t cap = b->cap ? b->cap : 256;
    while (cap < n)
        cap *= 2;
    uint8_t *p = PyMem_Realloc(b->p, cap);
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

PyDoc_STRVAR(pair_hashes_doc,
"pair_hashes(urls, texts) -> bytes\n\n"
"``mmh3.hash64(url + text)[0]`` of each pair as native int64 values. Raises\n"
"UnicodeEncodeError for a string UTF-8 cannot encode (lone surrogates), like mmh3.");

static PyObject *pair_hashes(PyObject *self, PyObject *args) {
    PyObject *urls, *texts;
    if (!PyArg_ParseTuple(args, "O!O!:pair_hashes", &PyList_Type, &urls, &PyList_Type, &texts))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(urls);
    if (PyList_GET_SIZE(texts) != n) {
        PyErr_SetString(PyExc_ValueError, "urls and texts differ in length");
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(int64_t));
    if (out == NULL)
        return NULL;
    uint64_t *dst = (uint64_t *)PyBytes_AS_STRING(out);
    Buf buf = {NULL, 0};
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t lu, lt;
        const char *u = PyUnicode_AsUTF8AndSize(PyList_GET_ITEM(urls, i), &lu);
        if (u == NULL)
            goto fail;
        const char *t = PyUnicode_AsUTF8AndSize(PyList_GET_ITEM(texts, i), &lt);
        if (t == NULL)
            goto fail;
        if (buf_reserve(&buf, lu + lt) < 0)
            goto fail;
        memcpy(buf.p, u, lu);
        memcpy(buf.p + lu, t, lt);
        uint64_t h = murmur3_h1(buf.p, lu + lt);
        memcpy(dst + i, &h, sizeof h);
    }
    PyMem_Free(buf.p);
    return out;
fail:
    PyMem_Free(buf.p);
    Py_DECREF(out);
    return NULL;
}

PyDoc_STRVAR(record_hashes_doc,
"record_hashes(prefix, offsets) -> bytes\n\n"
"``mmh3.hash64(prefix + str(offset).encode(), signed=False)[0]`` of each offset (a list of\n"
"non-negative ints) as native uint64 values; ``prefix`` is ``f\"{source_file}\\0\"`` in UTF-8.");

static PyObject *record_hashes(PyObject *self, PyObject *args) {
    const char *prefix;
    Py_ssize_t lp;
    PyObject *offsets;
    if (!PyArg_ParseTuple(args, "y#O!:record_hashes", &prefix, &lp, &PyList_Type, &offsets))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(offsets);
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(uint64_t));
    if (out == NULL)
        return NULL;
    uint64_t *dst = (uint64_t *)PyBytes_AS_STRING(out);
    Buf buf = {NULL, 0};
    if (buf_reserve(&buf, lp + 32) < 0)
        goto fail;
    memcpy(buf.p, prefix, lp);
    for (Py_ssize_t i = 0; i < n; i++) {
        long long v = PyLong_AsLongLong(PyList_GET_ITEM(offsets, i));
        if (v == -1 && PyErr_Occurred())
            goto fail;
        if (v < 0) {
            PyErr_SetString(PyExc_ValueError, "record offsets must be non-negative");
            goto fail;
        }
        int k = snprintf((char *)buf.p + lp, 32, "%lld", v);
        uint64_t h = murmur3_h1(buf.p, lp + k);
        memcpy(dst + i, &h, sizeof h);
    }
    PyMem_Free(buf.p);
    return out;
fail:
    PyMem_Free(buf.p);
    Py_DECREF(out);
    return NULL;
}

/* ---------------------------------------------------------------- the WAT link loop -------- */

static PyObject *S_path, *S_url, *S_alt, *S_root, *S_folder, *S_IMG_SRC, *S_NFC, *S_slash;
static PyObject *is_normalized; /* unicodedata.is_normalized */

/* What ftfy would repair: a UTF-8 lead byte read as Latin-1 followed by a continuation byte
 * read as Latin-1 or cp1252 (text._MOJIBAKE_PAIR). */
static inline int is_mojibake_follow(Py_UCS4 c) {
    if (c >= 0x80 && c <= 0xbf)
        return 1;
    switch (c) {
    case 0x152: case 0x153: case 0x160: case 0x161: case 0x178: case 0x17d: case 0x17e:
    case 0x192: case 0x2c6: case 0x2dc: case 0x2013: case 0x2014: case 0x2018: case 0x2019:
    case 0x201a: case 0x201c: case 0x201d: case 0x201e: case 0x2020: case 0x2021: case 0x2022:
    case 0x2026: case 0x2030: case 0x2039: case 0x203a: case 0x20ac: case 0x2122:
        return 1;
    }
    return 0;
}

/* 1 when clean_text(alt, max_chars) == alt is known without calling it (the collector's fast
 * path: printable, no entity, no space to fold, short enough, no mojibake pattern, NFC),
 * 0 when Python must decide, -1 on error. */
static int alt_is_clean(PyObject *alt, Py_ssize_t max_chars) {
    Py_ssize_t n = PyUnicode_GET_LENGTH(alt);
    if (n == 0 || n > max_chars)
        return 0;
    int kind = PyUnicode_KIND(alt);
    const void *data = PyUnicode_DATA(alt);
    if (PyUnicode_READ(kind, data, 0) == ' ' || PyUnicode_READ(kind, data, n - 1) == ' ')
        return 0;
    Py_UCS4 prev = 0, maxc = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_UCS4 c = PyUnicode_READ(kind, data, i);
        if (c < 0x80) {
            if (c < 0x20 || c == 0x7f || c == '&' || (c == ' ' && prev == ' '))
                return 0;
        } else {
            if (!Py_UNICODE_ISPRINTABLE(c))
                return 0;
            if (prev >= 0xc2 && prev <= 0xf4 && is_mojibake_follow(c))
                return 0;
        }
        if (c > maxc)
            maxc = c;
        prev = c;
    }
    /* every code point below U+0300 is NFC_Quick_Check=Yes: only other text needs the check */
    if (maxc < 0x300)
        return 1;
    PyObject *r = PyObject_CallFunctionObjArgs(is_normalized, S_NFC, alt, NULL);
    if (r == NULL)
        return -1;
    int ok = PyObject_IsTrue(r);
    Py_DECREF(r);
    return ok;
}

static inline int starts_http(int kind, const void *data, Py_ssize_t n) {
    static const char *h = "https://";
    if (n < 7)
        return 0;
    for (int i = 0; i < 4; i++)
        if (PyUnicode_READ(kind, data, i) != (Py_UCS4)h[i])
            return 0;
    Py_ssize_t j = 4;
    if (PyUnicode_READ(kind, data, 4) == 's')
        j = 5;
    if (n < j + 3)
        return 0;
    return PyUnicode_READ(kind, data, j) == ':' && PyUnicode_READ(kind, data, j + 1) == '/' &&
           PyUnicode_READ(kind, data, j + 2) == '/';
}

/* Whether Resolver.__call__ sends a relative URL to urljoin (common._NEEDS_URLJOIN, a leading
 * "?", "#" or ".", or a "//" network-path reference). */
static int needs_urljoin(int kind, const void *data, Py_ssize_t n) {
    Py_UCS4 first = PyUnicode_READ(kind, data, 0);
    if (first == '?' || first == '#' || first == '.')
        return 1;
    if (n > 1 && first == '/' && PyUnicode_READ(kind, data, 1) == '/')
        return 1;
    Py_UCS4 prev = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_UCS4 c = PyUnicode_READ(kind, data, i);
        if (c == '\t' || c == '\n' || c == '\r' || c == ':' || c == '\\')
            return 1;
        if ((prev == '.' && c == '/') || (prev == '/' && c == '.'))
            return 1;
        prev = c;
    }
    return 0;
}

typedef struct {
    PyObject *get_resolver; /* () -> Resolver, called once per record when needed */
    PyObject *base_url;     /* borrowed: the record's base URL as a str, or None when only
                               get_resolver() knows it */
    PyObject *resolver;     /* owned, NULL until needed */
    PyObject *root;         /* owned, NULL until known: Resolver.root and .folder */
    PyObject *folder;
} Res;

/* 1 and new references in *root and *folder when base is an http(s) URL that Resolver.__init__
 * splits itself (common.Resolver: lower-case scheme, printable, no space, an ASCII host without
 * IPv6 brackets, no dot segment in its path), with the values it gives them; 0 when the
 * Resolver must be built (urlsplit, dot segments); -1 on error. A Resolver costs ~10 us in
 * Python, and nearly every WAT record with image links needs one for its relative URLs. */
static int simple_split(PyObject *base, PyObject **root, PyObject **folder) {
    Py_ssize_t n = PyUnicode_GET_LENGTH(base);
    int kind = PyUnicode_KIND(base);
    const void *data = PyUnicode_DATA(base);
    if (!starts_http(kind, data, n))
        return 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_UCS4 c = PyUnicode_READ(kind, data, i);
        if (c == ' ' || !Py_UNICODE_ISPRINTABLE(c))
            return 0;
    }
    Py_ssize_t host = PyUnicode_READ(kind, data, 4) == 's' ? 8 : 7, e = host;
    for (; e < n; e++) {
        Py_UCS4 c = PyUnicode_READ(kind, data, e);
        if (c == '/' || c == '?' || c == '#')
            break;
        if (c >= 0x80 || c == '[' || c == ']')
            return 0;
    }
    if (e == host)
        return 0;
    Py_ssize_t slash = -1;
    for (Py_ssize_t i = e; i < n; i++) {
        Py_UCS4 c = PyUnicode_READ(kind, data, i);
        if (c == '?' || c == '#')
            break;
        if (c == '/')
            slash = i;
        else if (c == '.' && i > e && PyUnicode_READ(kind, data, i - 1) == '/')
            return 0; /* "/." in the path: the Resolver leaves every relative URL to urljoin */
    }
    *root = PyUnicode_Substring(base, 0, e);
    if (*root == NULL)
        return -1;
    /* an empty path reads as "/" */
    *folder = slash < 0 ? PyUnicode_Concat(*root, S_slash) : PyUnicode_Substring(base, 0, slash + 1);
    if (*folder == NULL) {
        Py_CLEAR(*root);
        return -1;
    }
    return 1;
}

/* Make r->resolver (the Python Resolver, for what needs urljoin). */
static int res_load(Res *r) {
    if (r->resolver != NULL)
        return 0;
    r->resolver = PyObject_CallNoArgs(r->get_resolver);
    return r->resolver == NULL ? -1 : 0;
}

/* Make r->root and r->folder known: split here when simple, else read from the Resolver. */
static int res_split(Res *r) {
    if (r->root != NULL)
        return 0;
    if (r->base_url != NULL && PyUnicode_Check(r->base_url)) {
        int ok = simple_split(r->base_url, &r->root, &r->folder);
        if (ok != 0)
            return ok < 0 ? -1 : 0;
    }
    if (res_load(r) < 0)
        return -1;
    r->root = PyObject_GetAttr(r->resolver, S_root);
    if (r->root == NULL)
        return -1;
    r->folder = PyObject_GetAttr(r->resolver, S_folder);
    if (r->folder == NULL)
        return -1;
    if (!PyUnicode_Check(r->root) || !PyUnicode_Check(r->folder)) {
        PyErr_SetString(PyExc_TypeError, "Resolver.root and .folder must be str");
        return -1;
    }
    return 0;
}

static void res_clear(Res *r) {
    Py_XDECREF(r->resolver);
    Py_XDECREF(r->root);
    Py_XDECREF(r->folder);
}

/* New reference to the absolute form of url, as Resolver.__call__ gives it. */
static PyObject *resolve(Res *r, PyObject *url) {
    Py_ssize_t n = PyUnicode_GET_LENGTH(url);
    int kind = PyUnicode_KIND(url);
    const void *data = PyUnicode_DATA(url);
    int plain = n > 0 && !Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, 0)) &&
                !Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, n - 1));
    if (plain && starts_http(kind, data, n))
        return Py_NewRef(url);
    if (res_split(r) < 0)
        return NULL;
    if (plain && PyUnicode_GET_LENGTH(r->root) > 0 && !needs_urljoin(kind, data, n)) {
        if (PyUnicode_READ(kind, data, 0) == '/')
            return PyUnicode_Concat(r->root, url);
        return PyUnicode_Concat(r->folder, url);
    }
    if (res_load(r) < 0)
        return NULL;
    return PyObject_CallOneArg(r->resolver, url);
}

static inline int is_img_path(PyObject *path) {
    /* path.startswith("IMG@") */
    if (!PyUnicode_Check(path) || PyUnicode_GET_LENGTH(path) < 4)
        return 0;
    int kind = PyUnicode_KIND(path);
    const void *d = PyUnicode_DATA(path);
    return PyUnicode_READ(kind, d, 0) == 'I' && PyUnicode_READ(kind, d, 1) == 'M' &&
           PyUnicode_READ(kind, d, 2) == 'G' && PyUnicode_READ(kind, d, 3) == '@';
}

PyDoc_STRVAR(img_pairs_doc,
"img_pairs(links, indices, urls, texts, max_chars, clean_alt, get_resolver, base_url=None)\n"
"-> (found, n)\n\n"
"The pairs of one WAT record's Links, appended to ``indices``/``urls``/``texts``: for each\n"
"``IMG@/src`` link with a URL and an ``alt`` key (``found``), its ordinal among the record's\n"
"``IMG@`` links, its URL resolved by ``get_resolver()`` (called once, when a URL is not\n"
"already absolute) and its alt text, when ``clean_alt(alt)`` leaves any; ``n`` pairs added.\n"
"``base_url``, when given, is the str the Resolver would be built on: a simple one is split\n"
"here, and ``get_resolver`` is called only for URLs that need urljoin.");

static PyObject *img_pairs(PyObject *self, PyObject *args) {
    PyObject *links, *indices, *urls, *texts, *clean_alt;
    Py_ssize_t max_chars;
    Res r = {NULL, NULL, NULL, NULL, NULL};
    if (!PyArg_ParseTuple(args, "O!O!O!O!nOO|O:img_pairs", &PyList_Type, &links, &PyList_Type,
                          &indices, &PyList_Type, &urls, &PyList_Type, &texts, &max_chars,
                          &clean_alt, &r.get_resolver, &r.base_url))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(links), k = -1, added = 0;
    int found = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *ln = PyList_GET_ITEM(links, i);
        PyObject *path = PyObject_GetAttr(ln, S_path);
        if (path == NULL)
            goto fail;
        int img = is_img_path(path);
        int src = img && PyUnicode_Compare(path, S_IMG_SRC) == 0;
        Py_DECREF(path);
        if (!img)
            continue;
        k++;
        if (!src)
            continue;
        PyObject *url = PyObject_GetAttr(ln, S_url);
        if (url == NULL)
            goto fail;
        PyObject *alt = PyObject_GetAttr(ln, S_alt);
        if (alt == NULL) {
            Py_DECREF(url);
            goto fail;
        }
        if (!PyUnicode_Check(url) || PyUnicode_GET_LENGTH(url) == 0 || alt == Py_None) {
            Py_DECREF(url);
            Py_DECREF(alt);
            continue;
        }
        found = 1;
        if (!PyUnicode_Check(alt)) {
            Py_DECREF(url);
            Py_DECREF(alt);
            PyErr_SetString(PyExc_TypeError, "alt must be str or None");
            goto fail;
        }
        if (PyUnicode_GET_LENGTH(alt) == 0) {
            Py_DECREF(url);
            Py_DECREF(alt);
            continue;
        }
        int clean = alt_is_clean(alt, max_chars);
        if (clean < 0) {
            Py_DECREF(url);
            Py_DECREF(alt);
            goto fail;
        }
        if (!clean) {
            Py_SETREF(alt, PyObject_CallOneArg(clean_alt, alt));
            if (alt == NULL) {
                Py_DECREF(url);
                goto fail;
            }
            if (!PyUnicode_Check(alt) || PyUnicode_GET_LENGTH(alt) == 0) {
                Py_DECREF(url);
                Py_DECREF(alt);
                continue; /* LAION needs alt text: no pair without it */
            }
        }
        PyObject *abs_url = resolve(&r, url);
        Py_DECREF(url);
        if (abs_url == NULL) {
            Py_DECREF(alt);
            goto fail;
        }
        PyObject *idx = PyLong_FromSsize_t(k);
        int err = idx == NULL || PyList_Append(indices, idx) < 0 ||
                  PyList_Append(urls, abs_url) < 0 || PyList_Append(texts, alt) < 0;
        Py_XDECREF(idx);
        Py_DECREF(abs_url);
        Py_DECREF(alt);
        if (err)
            goto fail;
        added++;
    }
    res_clear(&r);
    return Py_BuildValue("(On)", found ? Py_True : Py_False, added);
fail:
    res_clear(&r);
    return NULL;
}

/* ---------------------------------------------------------------- gzip members ----------- */

static PyObject *S_decompress, *S_eof, *S_unused_data;

/* compressed bytes per decompress() call: a member's end is found from what its last call leaves
 * unused, which the decompressor returns as a copy, so small steps keep that copy small */
#define MEMBER_STEP 4096

PyDoc_STRVAR(inflate_members_doc,
"inflate_members(buf, pos, final, decompressobj, error, cap) -> (members, pos, status)\n\n"
"The gzip members that start at ``buf[pos:]``, one after the other, each inflated whole by a\n"
"fresh ``decompressobj(31)`` (zlib's interface): ``members`` is a list of ``(offset, bytes)``,\n"
"``offset`` in ``buf``; ``pos`` where the next member starts. ``status`` says why it stopped:\n"
"0 at the end of ``buf``, 1 when the member at ``pos`` goes on past the end of ``buf`` (give\n"
"more bytes, ``final`` false), 2 at a member it does not read: not gzip, ``error`` raised,\n"
"cut by the end of a ``final`` buffer, or inflating to more than ``cap`` bytes.\n"
"records.iter_gzip_members is its Python twin.");

static PyObject *inflate_members(PyObject *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t pos, cap;
    int final;
    PyObject *factory, *error;
    if (!PyArg_ParseTuple(args, "y*npOOn:inflate_members", &view, &pos, &final, &factory, &error,
                          &cap))
        return NULL;
    const unsigned char *b = view.buf;
    Py_ssize_t n = view.len;
    int status = 0;
    PyObject *members = PyList_New(0), *d = NULL, *parts = NULL;
    if (members == NULL)
        goto fail;
    if (pos < 0 || pos > n) {
        PyErr_SetString(PyExc_ValueError, "pos out of range");
        goto fail;
    }
    while (pos < n) {
        if (n - pos < 2) {
            status = final ? 2 : 1;
            break;
        }
        if (b[pos] != 0x1f || b[pos + 1] != 0x8b) {
            status = 2;
            break;
        }
        d = PyObject_CallFunction(factory, "i", 31);
        if (d == NULL || (parts = PyList_New(0)) == NULL)
            goto fail;
        Py_ssize_t at = pos, size = 0;
        int done = 0; /* 1: the member's end, 2: not read here, 3: needs more input */
        while (!done) {
            Py_ssize_t step = n - at < MEMBER_STEP ? n - at : MEMBER_STEP;
            if (step == 0) {
                done = final ? 2 : 3;
                break;
            }
            PyObject *mv = PyMemoryView_FromMemory((char *)b + at, step, PyBUF_READ);
            if (mv == NULL)
                goto fail;
            PyObject *out = PyObject_CallMethodOneArg(d, S_decompress, mv);
            Py_DECREF(mv);
            if (out == NULL) {
                if (!PyErr_ExceptionMatches(error))
                    goto fail;
                PyErr_Clear();
                done = 2;
                break;
            }
            size += PyBytes_GET_SIZE(out);
            int err = PyList_Append(parts, out);
            Py_DECREF(out);
            if (err < 0)
                goto fail;
            PyObject *eof = PyObject_GetAttr(d, S_eof);
            if (eof == NULL)
                goto fail;
            int is_eof = PyObject_IsTrue(eof);
            Py_DECREF(eof);
            if (is_eof < 0)
                goto fail;
            if (is_eof) {
                PyObject *unused = PyObject_GetAttr(d, S_unused_data);
                if (unused == NULL)
                    goto fail;
                at += step - PyObject_Length(unused);
                Py_DECREF(unused);
                done = 1;
            } else {
                at += step;
                if (size > cap)
                    done = 2;
            }
        }
        Py_CLEAR(d);
        if (done != 1) {
            Py_CLEAR(parts);
            status = done == 3 ? 1 : 2;
            break;
        }
        PyObject *data;
        if (PyList_GET_SIZE(parts) == 1) {
            data = Py_NewRef(PyList_GET_ITEM(parts, 0));
        } else {
            PyObject *empty = PyBytes_FromStringAndSize(NULL, 0);
            if (empty == NULL)
                goto fail;
            data = PyObject_CallMethod(empty, "join", "O", parts);
            Py_DECREF(empty);
        }
        Py_CLEAR(parts);
        if (data == NULL)
            goto fail;
        PyObject *item = Py_BuildValue("(nN)", pos, data);
        if (item == NULL || PyList_Append(members, item) < 0) {
            Py_XDECREF(item);
            goto fail;
        }
        Py_DECREF(item);
        pos = at;
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("(Nni)", members, pos, status);
fail:
    Py_XDECREF(d);
    Py_XDECREF(parts);
    Py_XDECREF(members);
    PyBuffer_Release(&view);
    return NULL;
}

static inline int ascii_ieq(const unsigned char *s, const char *lower, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = s[i];
        if (c >= 'A' && c <= 'Z')
            c += 'a' - 'A';
        if (c != (unsigned char)lower[i])
            return 0;
    }
    return 1;
}

PyDoc_STRVAR(record_bounds_doc,
"record_bounds(data) -> (warc_type, block_start, block_end) or None\n\n"
"Where the block of the one WARC record ``data`` holds starts and ends, and its WARC-Type, when\n"
"the record is plain: ``WARC/1.0`` or ``1.1``, header lines ``Name: value`` (printable ASCII\n"
"names, printable or UTF-8 values), one ``Content-Length`` and one ``WARC-Type`` field (any\n"
"case), written exactly ``Content-Length: <digits>`` and ``WARC-Type: <a-z>``, the block as\n"
"long as declared and followed by CRLF CRLF and nothing else. None otherwise.\n"
"records.record_bounds is its Python twin.");

static PyObject *record_bounds(PyObject *self, PyObject *arg) {
    Py_buffer v;
    if (PyObject_GetBuffer(arg, &v, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *p = v.buf;
    Py_ssize_t n = v.len, i = 10, length = -1, ts = -1, te = -1;
    int n_len = 0, n_type = 0, lines = 0, high = 0;
    if (n < 10 || (memcmp(p, "WARC/1.0\r\n", 10) != 0 && memcmp(p, "WARC/1.1\r\n", 10) != 0))
        goto none;
    for (;;) {
        if (i + 1 < n && p[i] == '\r' && p[i + 1] == '\n') {
            i += 2; /* the empty line: the end of the header */
            break;
        }
        Py_ssize_t ns = i;
        while (i < n && p[i] >= '!' && p[i] <= '~' && p[i] != ':')
            i++;
        if (i == ns || i >= n || p[i] != ':')
            goto none;
        Py_ssize_t ne = i++, vs = i;
        while (i < n && ((p[i] >= ' ' && p[i] <= '~') || p[i] >= 0x80)) {
            high |= p[i] >= 0x80;
            i++;
        }
        if (i + 1 >= n || p[i] != '\r' || p[i + 1] != '\n')
            goto none;
        Py_ssize_t ve = i;
        i += 2;
        lines++;
        if (ne - ns == 14 && ascii_ieq(p + ns, "content-length", 14)) {
            n_len++;
            if (memcmp(p + ns, "Content-Length", 14) == 0 && ve - vs >= 2 && ve - vs <= 13 &&
                p[vs] == ' ') {
                Py_ssize_t value = 0, k = vs + 1;
                for (; k < ve && p[k] >= '0' && p[k] <= '9'; k++)
                    value = value * 10 + (p[k] - '0');
                if (k == ve)
                    length = value;
            }
        } else if (ne - ns == 9 && ascii_ieq(p + ns, "warc-type", 9)) {
            n_type++;
            if (memcmp(p + ns, "WARC-Type", 9) == 0 && ve - vs >= 2 && p[vs] == ' ') {
                Py_ssize_t k = vs + 1;
                while (k < ve && p[k] >= 'a' && p[k] <= 'z')
                    k++;
                if (k == ve) {
                    ts = vs + 1;
                    te = ve;
                }
            }
        }
    }
    if (lines == 0 || n_len != 1 || n_type != 1 || length < 0 || ts < 0)
        goto none;
    if (n != i + length + 4 || memcmp(p + n - 4, "\r\n\r\n", 4) != 0)
        goto none;
    if (high) { /* FastWARC reads invalid UTF-8 with replacement characters: its own way */
        PyObject *text = PyUnicode_DecodeUTF8((const char *)p, i, "strict");
        if (text == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
                goto fail;
            PyErr_Clear();
            goto none;
        }
        Py_DECREF(text);
    }
    PyObject *out = Py_BuildValue("(y#nn)", (const char *)p + ts, te - ts, i, i + length);
    PyBuffer_Release(&v);
    return out;
none:
    PyBuffer_Release(&v);
    Py_RETURN_NONE;
fail:
    PyBuffer_Release(&v);
    return NULL;
}

/* ---------------------------------------------------------------- module ------------------- */

static PyMethodDef methods[] = {
    {"img_pairs", img_pairs, METH_VARARGS, img_pairs_doc},
    {"pair_hashes", pair_hashes, METH_VARARGS, pair_hashes_doc},
    {"record_hashes", record_hashes, METH_VARARGS, record_hashes_doc},
    {"inflate_members", inflate_members, METH_VARARGS, inflate_members_doc},
    {"record_bounds", record_bounds, METH_O, record_bounds_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_speedups",
    "Compiled fast paths of WAT extraction (see laion_dask/stages/extract/_speedups.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__speedups(void) {
#define INTERN(var, s)                                                                            \
    if ((var = PyUnicode_InternFromString(s)) == NULL)                                            \
        return NULL;
    INTERN(S_path, "path");
    INTERN(S_url, "url");
    INTERN(S_alt, "alt");
    INTERN(S_root, "root");
    INTERN(S_folder, "folder");
    INTERN(S_IMG_SRC, "IMG@/src");
    INTERN(S_NFC, "NFC");
    INTERN(S_slash, "/");
    INTERN(S_decompress, "decompress");
    INTERN(S_eof, "eof");
    INTERN(S_unused_data, "unused_data");
#undef INTERN
    PyObject *ud = PyImport_ImportModule("unicodedata");
    if (ud == NULL)
        return NULL;
    is_normalized = PyObject_GetAttrString(ud, "is_normalized");
    Py_DECREF(ud);
    if (is_normalized == NULL)
        return NULL;
    return PyModule_Create(&module);
}
