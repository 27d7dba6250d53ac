/* metering._relay: a relayed answer metered in one C call.
 *
 * Most requests end as an answer relayed as vLLM sent it: its usage read out
 * of the bytes, priced, reported and its figures spelled as head lines. In
 * Python that is three calls and about 300 bytecodes a request
 * (gateway.meter.Meter.relay_reference, metering.usage.usage_in,
 * metering.pricing.GpuTariff.price_at); here it is one.
 *
 * relay() does exactly what the reference does, for the plain case only: a
 * completion whose first "model" key names the model asked for, a usage object
 * of integer counts (details null or an object of integers), a price that fits
 * in 64 bits. It answers None where the reference answers None (the model or
 * the usage key is not there), and NotImplemented for anything else: the
 * caller then runs the reference, which decides. So this file never has to be
 * right about an odd answer, only about the plain one, and
 * tests/metering/test_relay_native.py holds the two equal on generated answers.
 */

#define _GNU_SOURCE /* memmem */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

static PyObject *report_type;  /* metering.report.RequestReport */
static PyObject *usage_type;   /* metering.usage.TokenUsage */
static PyObject *cost_type;    /* metering.pricing.Cost */
static PyObject *names[7];     /* header names as bytes: request-id, prompt, completion,
                                  gpu, cost, loaded, cached */
static PyObject *empty_tuple;
static PyObject *zero;
static PyObject *status_200;

static PyObject *s_request_id, *s_tenant, *s_cache, *s_started, *s_first_token_at,
    *s_bill, *s_gpu_seconds, *s_attempts, *s_tier, *s_model;

#define REPORT_FIELDS 19

/* ---- the usage object ---------------------------------------------------- */

typedef struct {
    const char *p;
    const char *end;
} cursor;

static void skip_ws(cursor *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r'))
        c->p++;
}

/* A JSON integer without fraction or exponent, at most 18 digits. 1: read; 0: not plain. */
static int read_int(cursor *c, long long *out) {
    const char *p = c->p;
    int negative = 0;
    if (p < c->end && *p == '-') {
        negative = 1;
        p++;
    }
    const char *digits = p;
    long long value = 0;
    while (p < c->end && *p >= '0' && *p <= '9') {
        if (p - digits >= 18)
            return 0;
        value = value * 10 + (*p - '0');
        p++;
    }
    if (p == digits || (p - digits > 1 && *digits == '0'))
        return 0;
    if (p < c->end && (*p == '.' || *p == 'e' || *p == 'E'))
        return 0;
    c->p = p;
    *out = negative ? -value : value;
    return 1;
}

static int read_null(cursor *c) {
    if (c->end - c->p >= 4 && memcmp(c->p, "null", 4) == 0) {
        c->p += 4;
        return 1;
    }
    return 0;
}

/* A key without escapes or braces: its bytes in [*key, *key + *len). 1: read; 0: not plain.
 * A brace in a key is left to the reference, whose slice of the usage object ends at
 * braces it counts without reading strings (usage_in). */
static int read_key(cursor *c, const char **key, Py_ssize_t *len) {
    if (c->p >= c->end || *c->p != '"')
        return 0;
    const char *start = ++c->p;
    while (c->p < c->end && *c->p != '"') {
        if (*c->p == '\\' || *c->p == '{' || *c->p == '}' || (unsigned char)*c->p < 0x20)
            return 0;
        c->p++;
    }
    if (c->p >= c->end)
        return 0;
    *key = start;
    *len = c->p - start;
    c->p++;
    skip_ws(c);
    if (c->p >= c->end || *c->p != ':')
        return 0;
    c->p++;
    skip_ws(c);
    return 1;
}

#define KEY_IS(k, n, lit) ((n) == (Py_ssize_t)(sizeof(lit) - 1) && memcmp((k), (lit), (n)) == 0)

/* At an object's '{': 1 if members follow, 0 for an empty object (read), -1 for no object. */
static int open_object(cursor *c) {
    if (c->p >= c->end || *c->p != '{')
        return -1;
    c->p++;
    skip_ws(c);
    if (c->p < c->end && *c->p == '}') {
        c->p++;
        return 0;
    }
    return 1;
}

/* After a member's value: 1 if another follows (its ',' read), 0 at the object's '}' (read),
 * -1 for anything else. */
static int next_member(cursor *c) {
    skip_ws(c);
    if (c->p < c->end && *c->p == ',') {
        c->p++;
        skip_ws(c);
        return 1;
    }
    if (c->p < c->end && *c->p == '}') {
        c->p++;
        return 0;
    }
    return -1;
}

/* An object of integers and nulls (the details): its "cached_tokens", 0 if null or absent. */
static int read_details(cursor *c, long long *cached) {
    int seen = 0, more = open_object(c);
    while (more > 0) {
        const char *key;
        Py_ssize_t len;
        long long value = 0;
        if (!read_key(c, &key, &len))
            return 0;
        int is_null = read_null(c);
        if (!is_null && !read_int(c, &value))
            return 0;
        if (KEY_IS(key, len, "cached_tokens")) {
            if (seen++)
                return 0; /* a repeated key: the reference decides */
            *cached = is_null ? 0 : value;
        }
        more = next_member(c);
    }
    return more == 0;
}

/* The usage object at c (after "usage":). 1: prompt and completion read; 0: not plain. */
static int read_usage(cursor *c, long long *prompt, long long *completion, long long *cached) {
    int seen_prompt = 0, seen_completion = 0, seen_details = 0;
    *cached = 0;
    skip_ws(c);
    int more = open_object(c);
    while (more > 0) {
        const char *key;
        Py_ssize_t len;
        long long value = 0;
        if (!read_key(c, &key, &len))
            return 0;
        if (KEY_IS(key, len, "prompt_tokens_details")) {
            if (seen_details++)
                return 0;
            if (!read_null(c) && !read_details(c, cached))
                return 0;
        } else {
            if (!read_int(c, &value))
                return 0; /* a null count, or any other kind of value */
            if (KEY_IS(key, len, "prompt_tokens")) {
                if (seen_prompt++)
                    return 0;
                *prompt = value;
            } else if (KEY_IS(key, len, "completion_tokens")) {
                if (seen_completion++)
                    return 0;
                *completion = value;
            }
        }
        more = next_member(c);
    }
    return more == 0 && seen_prompt && seen_completion; /* {} has no counts */
}

/* ---- prices --------------------------------------------------------------- */

/* gpu_us * num / den rounded half to even; 0 if the ratio or the result is out of range. */
static int price(long long gpu_us, PyObject *ratio, long long *out) {
    if (!PyTuple_CheckExact(ratio) || PyTuple_GET_SIZE(ratio) != 2)
        return 0;
    int overflow = 0;
    long long num = PyLong_AsLongLongAndOverflow(PyTuple_GET_ITEM(ratio, 0), &overflow);
    if (overflow || num < 0 || (num == -1 && PyErr_Occurred()))
        return 0;
    long long den = PyLong_AsLongLongAndOverflow(PyTuple_GET_ITEM(ratio, 1), &overflow);
    if (overflow || den <= 0 || (den == -1 && PyErr_Occurred()))
        return 0;
    __int128 product = (__int128)gpu_us * num;
    __int128 quotient = product / den;
    __int128 twice = 2 * (product % den);
    if (twice > den || (twice == den && (quotient & 1)))
        quotient += 1;
    if (quotient > INT64_MAX)
        return 0;
    *out = (long long)quotient;
    return 1;
}

/* ---- helpers -------------------------------------------------------------- */

static PyObject *tuple_of(PyObject *type, Py_ssize_t n) {
    /* An instance of a tuple subclass without running its __new__ (tuple.__new__'s work). */
    return ((PyTypeObject *)type)->tp_alloc((PyTypeObject *)type, n);
}

/* ---- the record log ------------------------------------------------------ */

/* One relayed answer's report, kept compact until the recorder takes it: no Python
 * object is made for it on the request path, and the ones it refers to (the request
 * id, the configuration's names) live anyway. */
typedef struct {
    PyObject *request_id, *tenant, *tier, *model, *operation, *cache, *replica, *attempts;
    long long prompt, completion, cached, gpu_us, marginal, loaded, finished_us;
    double duration, ttft;
    int has_ttft;
} record;

typedef struct {
    PyObject_HEAD
    record *items;
    Py_ssize_t len, cap;
} RecordLog;

static void record_clear(record *r) {
    Py_XDECREF(r->request_id);
    Py_XDECREF(r->tenant);
    Py_XDECREF(r->tier);
    Py_XDECREF(r->model);
    Py_XDECREF(r->operation);
    Py_XDECREF(r->cache);
    Py_XDECREF(r->replica);
    Py_XDECREF(r->attempts);
}

/* The record as a RequestReport (new reference), or NULL with an exception. */
static PyObject *report_of_record(const record *r) {
    PyObject *usage = tuple_of(usage_type, 3);
    PyObject *cost = tuple_of(cost_type, 2);
    PyObject *report = tuple_of(report_type, REPORT_FIELDS);
    PyObject *item;
    if (usage == NULL || cost == NULL || report == NULL)
        goto fail;
#define SET(t, i, expr)                   \
    do {                                  \
        if ((item = (expr)) == NULL)      \
            goto fail;                    \
        PyTuple_SET_ITEM((t), (i), item); \
    } while (0)
#define REF(obj) (Py_INCREF(obj), (obj))
    SET(usage, 0, PyLong_FromLongLong(r->prompt));
    SET(usage, 1, PyLong_FromLongLong(r->completion));
    SET(usage, 2, PyLong_FromLongLong(r->cached));
    SET(cost, 0, PyLong_FromLongLong(r->marginal));
    SET(cost, 1, PyLong_FromLongLong(r->loaded));
    SET(report, 0, REF(r->request_id));
    SET(report, 1, REF(r->tenant));
    SET(report, 2, REF(r->tier));
    SET(report, 3, REF(r->model));
    SET(report, 4, REF(r->operation));
    SET(report, 5, usage);
    usage = NULL;
    SET(report, 6, PyLong_FromLongLong(r->gpu_us));
    SET(report, 7, cost);
    cost = NULL;
    SET(report, 8, REF(r->cache));
    SET(report, 9, REF(zero));
    SET(report, 10, REF(r->replica));
    SET(report, 11, REF(r->attempts));
    SET(report, 12, REF(status_200));
    SET(report, 13, PyLong_FromLongLong(r->finished_us));
    SET(report, 14, PyFloat_FromDouble(r->duration));
    SET(report, 15, r->has_ttft ? PyFloat_FromDouble(r->ttft) : REF(Py_None));
    SET(report, 16, REF(empty_tuple));
    SET(report, 17, REF(Py_None));
    SET(report, 18, REF(Py_None));
#undef SET
#undef REF
    return report;
fail:
    Py_XDECREF(usage);
    Py_XDECREF(cost);
    Py_XDECREF(report);
    return NULL;
}

static int log_append(RecordLog *log, const record *r) {
    if (log->len == log->cap) {
        Py_ssize_t cap = log->cap ? log->cap * 2 : 256;
        record *items = PyMem_Realloc(log->items, cap * sizeof(record));
        if (items == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        log->items = items;
        log->cap = cap;
    }
    record *slot = &log->items[log->len++];
    *slot = *r;
    Py_INCREF(slot->request_id);
    Py_INCREF(slot->tenant);
    Py_INCREF(slot->tier);
    Py_INCREF(slot->model);
    Py_INCREF(slot->operation);
    Py_INCREF(slot->cache);
    Py_INCREF(slot->replica);
    Py_INCREF(slot->attempts);
    return 0;
}

static PyObject *log_take(RecordLog *log, PyObject *unused) {
    /* Every record as a RequestReport, oldest first; the log is empty after. */
    PyObject *reports = PyList_New(log->len);
    if (reports == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < log->len; i++) {
        PyObject *report = report_of_record(&log->items[i]);
        if (report == NULL) {
            Py_DECREF(reports);
            return NULL; /* the log is left as it was */
        }
        PyList_SET_ITEM(reports, i, report);
    }
    for (Py_ssize_t i = 0; i < log->len; i++)
        record_clear(&log->items[i]);
    log->len = 0;
    return reports;
}

static Py_ssize_t log_length(RecordLog *log) {
    return log->len;
}

static void log_dealloc(RecordLog *log) {
    for (Py_ssize_t i = 0; i < log->len; i++)
        record_clear(&log->items[i]);
    PyMem_Free(log->items);
    Py_TYPE(log)->tp_free((PyObject *)log);
}

static PyMethodDef log_methods[] = {
    {"take", (PyCFunction)log_take, METH_NOARGS,
     "take() -> list[RequestReport]: every record, oldest first; the log is emptied"},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods log_as_sequence = {
    .sq_length = (lenfunc)log_length,
};

static PyTypeObject RecordLogType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "metering._relay.RecordLog",
    .tp_doc = "Relayed answers' reports, kept compact until take().",
    .tp_basicsize = sizeof(RecordLog),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)log_dealloc,
    .tp_methods = log_methods,
    .tp_as_sequence = &log_as_sequence,
};

/* ---- relay ---------------------------------------------------------------- */

static PyObject *not_plain(void) {
    Py_RETURN_NOTIMPLEMENTED;
}

static PyObject *relay(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "relay() takes 10 arguments");
        return NULL;
    }
    if (report_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "metering._relay.configure() was not called");
        return NULL;
    }
    PyObject *body = args[0], *model_key = args[1], *ctx = args[2], *decision = args[3];
    PyObject *replica_url = args[4], *operation = args[5], *marginal_ratio = args[6];
    PyObject *loaded_ratio = args[7], *log = args[9];
    double now = PyFloat_AsDouble(args[8]);
    if (now == -1.0 && PyErr_Occurred())
        return NULL;
    if (log != Py_None && !PyObject_TypeCheck(log, &RecordLogType)) {
        PyErr_SetString(PyExc_TypeError, "relay(): log must be a RecordLog or None");
        return NULL;
    }
    if (!PyBytes_Check(body) || !PyBytes_Check(model_key))
        return not_plain();

    const char *data = PyBytes_AS_STRING(body);
    Py_ssize_t size = PyBytes_GET_SIZE(body);
    /* The first "model" key must be the model asked for (usage_in's check). */
    const char *model_at = memmem(data, size, "\"model\":", 8);
    Py_ssize_t key_len = PyBytes_GET_SIZE(model_key);
    if (model_at == NULL || (data + size) - model_at < key_len ||
        memcmp(model_at, PyBytes_AS_STRING(model_key), key_len) != 0)
        Py_RETURN_NONE;
    /* The last "usage" key. */
    const char *usage_at = NULL;
    for (const char *p = data + size - 8; size >= 8 && p >= data; p--) {
        if (*p == '"' && memcmp(p, "\"usage\":", 8) == 0) {
            usage_at = p;
            break;
        }
    }
    if (usage_at == NULL)
        Py_RETURN_NONE;
    cursor c = {usage_at + 8, data + size};
    record r;
    memset(&r, 0, sizeof r);
    if (!read_usage(&c, &r.prompt, &r.completion, &r.cached) || r.prompt < 0 ||
        r.completion < 0 || r.cached < 0)
        return not_plain();

    PyObject *started_obj = NULL, *first_obj = NULL, *bill = NULL, *gpu_obj = NULL;
    PyObject *result = NULL, *report = NULL, *lines = NULL;
    r.operation = operation;
    r.replica = replica_url;
    if (!(r.request_id = PyObject_GetAttr(ctx, s_request_id)) ||
        !(r.tenant = PyObject_GetAttr(ctx, s_tenant)) ||
        !(r.cache = PyObject_GetAttr(ctx, s_cache)) ||
        !(started_obj = PyObject_GetAttr(ctx, s_started)) ||
        !(first_obj = PyObject_GetAttr(ctx, s_first_token_at)) ||
        !(bill = PyObject_GetAttr(ctx, s_bill)) ||
        !(gpu_obj = PyObject_GetAttr(bill, s_gpu_seconds)) ||
        !(r.attempts = PyObject_GetAttr(bill, s_attempts)) ||
        !(r.tier = PyObject_GetAttr(decision, s_tier)) ||
        !(r.model = PyObject_GetAttr(decision, s_model)))
        goto done;
    PyObject *request_id = r.request_id;
    if (!PyUnicode_Check(request_id) || !PyUnicode_IS_ASCII(request_id) ||
        strlen((const char *)PyUnicode_DATA(request_id)) !=
            (size_t)PyUnicode_GET_LENGTH(request_id) ||
        !PyFloat_Check(started_obj) || !PyFloat_Check(gpu_obj) ||
        (first_obj != Py_None && !PyFloat_Check(first_obj))) {
        result = not_plain();
        goto done;
    }
    /* to_micros: round(gpu_seconds * 1e6), half to even; 0 for NaN or an infinity. */
    double scaled = PyFloat_AS_DOUBLE(gpu_obj) * 1e6;
    if (isfinite(scaled)) {
        double rounded = nearbyint(scaled);
        if (rounded < 0 || rounded > 9e18) {
            result = not_plain();
            goto done;
        }
        r.gpu_us = (long long)rounded;
    }
    if (!price(r.gpu_us, marginal_ratio, &r.marginal) ||
        !price(r.gpu_us, loaded_ratio, &r.loaded)) {
        PyErr_Clear();
        result = not_plain();
        goto done;
    }
    struct timespec wall;
    clock_gettime(CLOCK_REALTIME, &wall); /* time.time_ns()'s clock */
    r.finished_us = (long long)wall.tv_sec * 1000000LL + wall.tv_nsec / 1000;
    double started = PyFloat_AS_DOUBLE(started_obj);
    r.duration = now - started;
    if (first_obj != Py_None) {
        r.has_ttft = 1;
        r.ttft = PyFloat_AS_DOUBLE(first_obj) - started;
    }

    /* The figures' head lines (metering.report.FIGURE_LINES, CACHED_LINE). */
    char buffer[1024];
    int n = snprintf(
        buffer, sizeof buffer,
        "%s: %s\r\n%s: %lld\r\n%s: %lld\r\n%s: %lld.%06lld\r\n%s: %lld.%09lld\r\n"
        "%s: %lld.%09lld\r\n",
        PyBytes_AS_STRING(names[0]), (const char *)PyUnicode_DATA(request_id),
        PyBytes_AS_STRING(names[1]), r.prompt, PyBytes_AS_STRING(names[2]), r.completion,
        PyBytes_AS_STRING(names[3]), r.gpu_us / 1000000, r.gpu_us % 1000000,
        PyBytes_AS_STRING(names[4]), r.marginal / 1000000000, r.marginal % 1000000000,
        PyBytes_AS_STRING(names[5]), r.loaded / 1000000000, r.loaded % 1000000000);
    if (n > 0 && n < (int)sizeof buffer && r.cached)
        n += snprintf(buffer + n, sizeof buffer - n, "%s: %lld\r\n",
                      PyBytes_AS_STRING(names[6]), r.cached);
    if (n <= 0 || n >= (int)sizeof buffer) {
        result = not_plain(); /* a request id too long for the buffer */
        goto done;
    }
    if ((lines = PyBytes_FromStringAndSize(buffer, n)) == NULL)
        goto done;
    if (log != Py_None) { /* kept compact for the recorder: no report made now */
        if (log_append((RecordLog *)log, &r) < 0)
            goto done;
        result = PyTuple_Pack(2, Py_None, lines);
    } else if ((report = report_of_record(&r)) != NULL) {
        result = PyTuple_Pack(2, report, lines);
    }
done:
    r.operation = r.replica = NULL; /* borrowed */
    record_clear(&r);
    Py_XDECREF(started_obj);
    Py_XDECREF(first_obj);
    Py_XDECREF(bill);
    Py_XDECREF(gpu_obj);
    Py_XDECREF(report);
    Py_XDECREF(lines);
    return result;
}

static PyObject *configure(PyObject *module, PyObject *args) {
    PyObject *report, *usage, *cost, *header_names;
    if (!PyArg_ParseTuple(args, "OOOO!", &report, &usage, &cost, &PyTuple_Type, &header_names))
        return NULL;
    if (PyTuple_GET_SIZE(header_names) != 7) {
        PyErr_SetString(PyExc_ValueError, "configure() wants 7 header names");
        return NULL;
    }
    PyObject *types[3] = {report, usage, cost};
    for (int i = 0; i < 3; i++) {
        if (!PyType_Check(types[i]) ||
            !PyType_IsSubtype((PyTypeObject *)types[i], &PyTuple_Type)) {
            PyErr_SetString(PyExc_TypeError, "configure() wants tuple subclasses");
            return NULL;
        }
    }
    for (int i = 0; i < 7; i++) {
        PyObject *name = PyTuple_GET_ITEM(header_names, i);
        if (!PyBytes_Check(name) || strlen(PyBytes_AS_STRING(name)) != (size_t)PyBytes_GET_SIZE(name)) {
            PyErr_SetString(PyExc_TypeError, "header names must be bytes without NUL");
            return NULL;
        }
        Py_INCREF(name);
        Py_XSETREF(names[i], name);
    }
    Py_INCREF(report);
    Py_XSETREF(report_type, report);
    Py_INCREF(usage);
    Py_XSETREF(usage_type, usage);
    Py_INCREF(cost);
    Py_XSETREF(cost_type, cost);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"relay", (PyCFunction)(void (*)(void))relay, METH_FASTCALL,
     "relay(body, model_key, ctx, decision, replica_url, operation, marginal_ratio, "
     "loaded_ratio, now, log) -> (report | None, head_lines) | None | NotImplemented"},
    {"configure", configure, METH_VARARGS,
     "configure(RequestReport, TokenUsage, Cost, header_names): once, before relay()"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "metering._relay", "A relayed answer metered in one C call.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__relay(void) {
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL)
        return NULL;
    empty_tuple = PyTuple_New(0);
    zero = PyLong_FromLong(0);
    status_200 = PyLong_FromLong(200);
#define INTERN(var, text) \
    if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL
    INTERN(s_request_id, "request_id");
    INTERN(s_tenant, "tenant");
    INTERN(s_cache, "cache");
    INTERN(s_started, "started");
    INTERN(s_first_token_at, "first_token_at");
    INTERN(s_bill, "bill");
    INTERN(s_gpu_seconds, "gpu_seconds");
    INTERN(s_attempts, "attempts");
    INTERN(s_tier, "tier");
    INTERN(s_model, "model");
#undef INTERN
    if (empty_tuple == NULL || zero == NULL || status_200 == NULL)
        return NULL;
    if (PyType_Ready(&RecordLogType) < 0)
        return NULL;
    Py_INCREF(&RecordLogType);
    if (PyModule_AddObject(module, "RecordLog", (PyObject *)&RecordLogType) < 0) {
        Py_DECREF(&RecordLogType);
        return NULL;
    }
    return module;
}
