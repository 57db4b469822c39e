/* Optional C accelerator for the per-row hot paths: the walks over pgoutput TupleData (to
 * JSON, to typed values) and the assembler's Insert/Update/Delete branch.
 *
 * Each has a pure-Python equivalent (rowcompile.py, relcache.py, assembly.py) that produces
 * the same results; the package runs without this module. No function here raises for bad
 * input bytes: anything irregular returns None and the caller takes its careful Python path,
 * which names the problem. Every length is checked against the buffer before it is used.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include <structmember.h>

#define KIND_TEXT 't'
#define KIND_BINARY 'b'
#define KIND_NULL 'n'
#define KIND_UNCHANGED 'u'

static uint32_t
be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* Reads the header of the value at data[*pos]: its kind, and for 't'/'b' where its bytes
 * start and how long they are. Returns 0 when the bytes run past the end. */
static int
next_value(const unsigned char *data, Py_ssize_t len, Py_ssize_t *pos, int *kind,
           Py_ssize_t *start, Py_ssize_t *size)
{
    Py_ssize_t p = *pos;
    if (p >= len)
        return 0;
    *kind = data[p];
    if (*kind == KIND_TEXT || *kind == KIND_BINARY) {
        if (len - p < 5)
            return 0;
        uint32_t n = be32(data + p + 1);
        if ((uint64_t)n > (uint64_t)(len - p - 5))
            return 0;
        *start = p + 5;
        *size = (Py_ssize_t)n;
        *pos = p + 5 + (Py_ssize_t)n;
    }
    else {
        *start = p + 1;
        *size = 0;
        *pos = p + 1;
    }
    return 1;
}

static int
read_count(const unsigned char *data, Py_ssize_t len, Py_ssize_t pos, Py_ssize_t ncols)
{
    return pos >= 0 && len - pos >= 2 && ((data[pos] << 8) | data[pos + 1]) == ncols;
}

/* The values of the TupleData at data[pos:] (bytes for text and binary, None for NULL and
 * unchanged TOAST) in a new list, with *flags: 1 = some text value, 2 = some binary value,
 * 4 = some unchanged-TOAST column. Py_None (a new reference) when the bytes are irregular;
 * NULL with an exception set when out of memory. */
static PyObject *
split_values(const unsigned char *data, Py_ssize_t len, Py_ssize_t pos, Py_ssize_t ncols,
             int *flags)
{
    *flags = 0;
    if (!read_count(data, len, pos, ncols))
        return Py_NewRef(Py_None);
    PyObject *values = PyList_New(ncols);
    if (values == NULL)
        return NULL;
    pos += 2;
    for (Py_ssize_t i = 0; i < ncols; i++) {
        int kind;
        Py_ssize_t start, size;
        PyObject *value;
        if (!next_value(data, len, &pos, &kind, &start, &size))
            goto irregular;
        if (kind == KIND_TEXT || kind == KIND_BINARY) {
            *flags |= kind == KIND_TEXT ? 1 : 2;
            value = PyBytes_FromStringAndSize((const char *)data + start, size);
            if (value == NULL) {
                Py_DECREF(values);
                return NULL;
            }
        }
        else if (kind == KIND_NULL || kind == KIND_UNCHANGED) {
            *flags |= kind == KIND_UNCHANGED ? 4 : 0;
            value = Py_NewRef(Py_None);
        }
        else
            goto irregular;
        PyList_SET_ITEM(values, i, value);
    }
    return values;
irregular:
    Py_DECREF(values);
    return Py_NewRef(Py_None);
}

/* A (..., buf, pos) call's buffer and position: 1, or 0 with an exception set (and no buffer
 * to release). */
static int
buffer_at(PyObject *buf, PyObject *pos_obj, Py_buffer *view, Py_ssize_t *pos)
{
    *pos = PyLong_AsSsize_t(pos_obj);
    if (*pos == -1 && PyErr_Occurred())
        return 0;
    return PyObject_GetBuffer(buf, view, PyBUF_SIMPLE) == 0;
}

/* typed_row(template, load_text_row, load_binary_row, buf, pos) -> dict | None
 *
 * {name: value} for a TupleData whose values are all text or all binary (NULLs allowed),
 * converted by one call of the matching row loader (psycopg's Transformer.load_sequence).
 * ``template`` is dict.fromkeys(column names): copying it gives a dict already sized and
 * keyed, whose values are then replaced. The relation's arguments come first so that a
 * functools.partial binds them once. None for anything else: bad bytes, unchanged TOAST,
 * mixed formats, a loader that raised an Exception or returned the wrong shape. */
static PyObject *
typed_row(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5 || !PyDict_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError,
                        "typed_row(template: dict, load_text_row, load_binary_row, buf, pos)");
        return NULL;
    }
    PyObject *template = args[0];
    Py_ssize_t ncols = PyDict_GET_SIZE(template);
    Py_ssize_t pos;
    Py_buffer view;
    if (!buffer_at(args[3], args[4], &view, &pos))
        return NULL;
    int flags;
    PyObject *values = split_values(view.buf, view.len, pos, ncols, &flags);
    PyBuffer_Release(&view);
    if (values == NULL || values == Py_None)
        return values;
    PyObject *loader = flags & ~1 ? (flags == 2 ? args[2] : NULL) : args[1];
    if (loader == NULL) {
        Py_DECREF(values);
        Py_RETURN_NONE;
    }
    PyObject *loaded = PyObject_CallOneArg(loader, values);
    Py_DECREF(values);
    if (loaded == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_Exception))
            return NULL;
        PyErr_Clear(); /* a bad value: the Python loop names it */
        Py_RETURN_NONE;
    }
    PyObject *row = NULL;
    if (!PyTuple_Check(loaded) || PyTuple_GET_SIZE(loaded) != ncols) {
        row = Py_NewRef(Py_None);
        goto done;
    }
    row = PyDict_Copy(template);
    if (row == NULL)
        goto done;
    PyObject *key, *unused;
    Py_ssize_t at = 0, i = 0;
    while (PyDict_Next(template, &at, &key, &unused)) {
        if (i >= ncols || PyDict_SetItem(row, key, PyTuple_GET_ITEM(loaded, i++)) < 0) {
            Py_CLEAR(row);
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_RuntimeError, "typed_row: template changed size");
            goto done;
        }
    }
done:
    Py_DECREF(loaded);
    return row;
}

/* The raw bytes of the columns at ``indexes`` (ascending) of the TupleData at data[pos:]:
 * one bytes object for one column, a tuple for several; *complete: whether no column is
 * unchanged TOAST. Py_None (new) when a key column is NULL or unchanged, or the bytes are
 * irregular; NULL with an exception set. */
static PyObject *
read_key(PyObject *indexes, Py_ssize_t ncols, const unsigned char *data, Py_ssize_t len,
         Py_ssize_t pos, int *complete)
{
    Py_ssize_t nkeys = PyTuple_GET_SIZE(indexes);
    *complete = 1;
    if (nkeys < 1 || !read_count(data, len, pos, ncols))
        return Py_NewRef(Py_None);
    PyObject *key = PyTuple_New(nkeys);
    if (key == NULL)
        return NULL;
    pos += 2;
    Py_ssize_t k = 0, want = PyLong_AsSsize_t(PyTuple_GET_ITEM(indexes, 0));
    if (want == -1 && PyErr_Occurred())
        goto failed;
    for (Py_ssize_t i = 0; i < ncols; i++) {
        int kind;
        Py_ssize_t start, size;
        if (!next_value(data, len, &pos, &kind, &start, &size))
            goto declined;
        if (kind == KIND_UNCHANGED)
            *complete = 0;
        else if (kind != KIND_TEXT && kind != KIND_BINARY && kind != KIND_NULL)
            goto declined;
        if (i != want)
            continue;
        if (kind != KIND_TEXT && kind != KIND_BINARY)
            goto declined; /* a key column NULL or not sent */
        PyObject *value = PyBytes_FromStringAndSize((const char *)data + start, size);
        if (value == NULL)
            goto failed;
        PyTuple_SET_ITEM(key, k++, value);
        if (k < nkeys) {
            Py_ssize_t next = PyLong_AsSsize_t(PyTuple_GET_ITEM(indexes, k));
            if (next == -1 && PyErr_Occurred())
                goto failed;
            if (next <= want)
                goto declined; /* not ascending */
            want = next;
        }
        else
            want = -1;
    }
    if (k != nkeys)
        goto declined;
    if (nkeys == 1) {
        PyObject *only = Py_NewRef(PyTuple_GET_ITEM(key, 0));
        Py_DECREF(key);
        return only;
    }
    return key;
declined:
    Py_DECREF(key);
    return Py_NewRef(Py_None);
failed:
    Py_DECREF(key);
    return NULL;
}

/* row_key(indexes, ncols, buf, pos) -> (key, complete) | None
 *
 * A row's identity without converting it: read_key's key of the TupleData at buf[pos:], and
 * whether no column is unchanged TOAST. None when a key column is NULL or unchanged, or the
 * bytes are irregular. The relation's arguments come first for a functools.partial. The
 * Python twin is relcache.row_key. */
static PyObject *
row_key(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyTuple_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "row_key(indexes: tuple, ncols, buf, pos)");
        return NULL;
    }
    Py_ssize_t ncols = PyLong_AsSsize_t(args[1]);
    if (ncols == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t pos;
    Py_buffer view;
    if (!buffer_at(args[2], args[3], &view, &pos))
        return NULL;
    int complete;
    PyObject *key = read_key(args[0], ncols, view.buf, view.len, pos, &complete);
    PyBuffer_Release(&view);
    if (key == NULL || key == Py_None)
        return key;
    PyObject *result = Py_BuildValue("(OO)", key, complete ? Py_True : Py_False);
    Py_DECREF(key);
    return result;
}

/* ---- RowChange construction ---------------------------------------------------------
 *
 * The assembler makes one RowChange per Insert/Update/Delete. In Python that is four frames
 * (feed's branch, _row, the relation lookup, __init__'s six slot setters); here it is one
 * call. bind_row_change reads the class's slot offsets once, from its member descriptors,
 * so the object is the same one __init__ would build (a frozen slotted dataclass). */

enum { F_OP, F_RELATION, F_RAW, F_NEW_AT, F_OLD_AT, F_OLD_KIND, N_FIELDS };

static PyTypeObject *row_change_type = NULL;
static Py_ssize_t row_offsets[N_FIELDS];
static PyObject *op_insert, *op_update, *op_delete, *kind_key, *kind_old;

/* The offsets of cls's object slots named by fields (n of them) into offsets. */
static int
slot_offsets(PyObject *cls_obj, PyObject *fields, int n, Py_ssize_t *offsets)
{
    PyTypeObject *cls = (PyTypeObject *)cls_obj;
    for (int i = 0; i < n; i++) {
        PyObject *descr = PyObject_GetAttr(cls_obj, PyTuple_GET_ITEM(fields, i));
        if (descr == NULL)
            return 0;
        int ok = Py_IS_TYPE(descr, &PyMemberDescr_Type) &&
                 ((PyMemberDescrObject *)descr)->d_common.d_type == cls &&
                 ((PyMemberDescrObject *)descr)->d_member->type == T_OBJECT_EX &&
                 !(((PyMemberDescrObject *)descr)->d_member->flags & READONLY);
        if (ok)
            offsets[i] = ((PyMemberDescrObject *)descr)->d_member->offset;
        Py_DECREF(descr);
        if (!ok) {
            PyErr_Format(PyExc_TypeError, "%R is not an object slot of %s",
                         PyTuple_GET_ITEM(fields, i), cls->tp_name);
            return 0;
        }
    }
    return 1;
}

/* bind_row_change(cls, fields): fields names the slots op, relation, raw, new_at, old_at and
 * old_kind, in that order. */
static PyObject *
bind_row_change(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyType_Check(args[0]) || !PyTuple_Check(args[1]) ||
        PyTuple_GET_SIZE(args[1]) != N_FIELDS) {
        PyErr_SetString(PyExc_TypeError, "bind_row_change(cls, fields: 6-tuple)");
        return NULL;
    }
    Py_ssize_t offsets[N_FIELDS];
    if (!slot_offsets(args[0], args[1], N_FIELDS, offsets))
        return NULL;
    memcpy(row_offsets, offsets, sizeof(offsets));
    Py_XSETREF(row_change_type, (PyTypeObject *)Py_NewRef(args[0]));
    Py_RETURN_NONE;
}

static int
set_slot(PyObject *obj, int field, PyObject *value)
{
    if (value == NULL)
        return 0;
    *(PyObject **)((char *)obj + row_offsets[field]) = value; /* steals the reference */
    return 1;
}

/* The Insert, Update or Delete whose relation id is at payload[pos:] (payload: bytes), as a
 * new RowChange; None for anything the Python path must look at (an unknown relation, a
 * marker out of place, a bad old tuple); NULL with an exception set. */
static PyObject *
make_row(PyObject *relations, PyObject *payload, Py_ssize_t pos)
{
    if (row_change_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "row_change before bind_row_change");
        return NULL;
    }
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(payload);
    Py_ssize_t len = PyBytes_GET_SIZE(payload);
    if (pos < 1 || len - pos < 5)
        Py_RETURN_NONE;
    PyObject *key = PyLong_FromUnsignedLong(be32(data + pos));
    if (key == NULL)
        return NULL;
    PyObject *relation = PyDict_GetItemWithError(relations, key); /* borrowed */
    Py_DECREF(key);
    if (relation == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    int tag = data[0], marker = data[pos + 4];
    Py_ssize_t at = pos + 5, new_at = -1, old_at = -1;
    PyObject *op, *old_kind = Py_None;
    if (tag == 'I' && marker == 'N') {
        op = op_insert;
        new_at = at;
    }
    else if (tag == 'U' && marker == 'N') {
        op = op_update;
        new_at = at;
    }
    else if ((tag == 'U' || tag == 'D') && (marker == 'K' || marker == 'O')) {
        old_kind = marker == 'K' ? kind_key : kind_old;
        old_at = at;
        if (tag == 'D')
            op = op_delete;
        else {
            /* the new tuple follows the old one, after an 'N' */
            if (len - at < 2)
                Py_RETURN_NONE;
            Py_ssize_t p = at + 2, ncols = (data[at] << 8) | data[at + 1];
            for (Py_ssize_t i = 0; i < ncols; i++) {
                int kind;
                Py_ssize_t start, size;
                if (!next_value(data, len, &p, &kind, &start, &size) ||
                    (kind != KIND_TEXT && kind != KIND_BINARY && kind != KIND_NULL &&
                     kind != KIND_UNCHANGED))
                    Py_RETURN_NONE;
            }
            if (p >= len || data[p] != 'N')
                Py_RETURN_NONE;
            op = op_update;
            new_at = p + 1;
        }
    }
    else
        Py_RETURN_NONE;

    PyObject *obj = row_change_type->tp_alloc(row_change_type, 0);
    if (obj == NULL)
        return NULL;
    if (!set_slot(obj, F_OP, Py_NewRef(op)) || !set_slot(obj, F_RELATION, Py_NewRef(relation)) ||
        !set_slot(obj, F_RAW, Py_NewRef(payload)) ||
        !set_slot(obj, F_NEW_AT, PyLong_FromSsize_t(new_at)) ||
        !set_slot(obj, F_OLD_AT, PyLong_FromSsize_t(old_at)) ||
        !set_slot(obj, F_OLD_KIND, Py_NewRef(old_kind))) {
        Py_DECREF(obj);
        return NULL;
    }
    return obj;
}

/* row_change(relations, payload, pos) -> RowChange | None: make_row for the assembler. */
static PyObject *
row_change(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyDict_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "row_change(relations: dict, payload, pos)");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[2]);
    if (pos == -1 && PyErr_Occurred())
        return NULL;
    if (!PyBytes_CheckExact(args[1]))
        Py_RETURN_NONE;
    return make_row(args[0], args[1], pos);
}

/* put_row(relations, changes, message) -> bool
 *
 * The stream's fast path, for a CopyData message as psycopg hands it over (any buffer): when
 * it is an XLogData ('w', 24 header bytes) carrying an Insert, Update or Delete that make_row
 * takes, the RowChange over its payload is appended to changes (the open transaction's list)
 * and the answer is True. False leaves the message untouched for the general path. Per row
 * this saves the header unpacking, the payload slice and the assembler's Python frames. */
#define XLOG_HEADER 25

/* put_row's work: 1 appended, 0 left to the general path, -1 error. */
static int
put_one(PyObject *relations, PyObject *changes, PyObject *message)
{
    Py_buffer view;
    if (PyObject_GetBuffer(message, &view, PyBUF_SIMPLE) < 0)
        return -1;
    const unsigned char *data = (const unsigned char *)view.buf;
    if (view.len < XLOG_HEADER + 6 || data[0] != 'w' ||
        (data[XLOG_HEADER] != 'I' && data[XLOG_HEADER] != 'U' && data[XLOG_HEADER] != 'D')) {
        PyBuffer_Release(&view);
        return 0;
    }
    PyObject *payload = PyBytes_FromStringAndSize((const char *)data + XLOG_HEADER,
                                                  view.len - XLOG_HEADER);
    PyBuffer_Release(&view);
    if (payload == NULL)
        return -1;
    PyObject *row = make_row(relations, payload, 1);
    Py_DECREF(payload);
    if (row == NULL)
        return -1;
    if (row == Py_None) {
        Py_DECREF(row);
        return 0;
    }
    int failed = PyList_Append(changes, row);
    Py_DECREF(row);
    return failed ? -1 : 1;
}

static PyObject *
put_row(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyDict_Check(args[0]) || !PyList_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "put_row(relations: dict, changes: list, message)");
        return NULL;
    }
    int got = put_one(args[0], args[1], args[2]);
    if (got < 0)
        return NULL;
    return PyBool_FromLong(got);
}

/* pump_rows(get_copy_data, relations, changes, limit) -> (taken, last, pending)
 *
 * The stream's read loop for a run of row changes, in one call: get_copy_data(1) (psycopg's
 * PGconn method) again and again, each CopyData that put_row takes appended to changes, up
 * to ``limit`` of them. Returns how many were taken, the last one taken (its message: the
 * stream notes its position), and ``pending``: the (nbytes, data) get_copy_data returned
 * for the first message not taken, which the caller handles as usual (any other message, a
 * row put_row leaves to Python, nothing buffered, the end of the copy), or None when the
 * limit stopped the run. Per row this saves the loop's and the session's Python frames. */
static PyObject *
pump_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyDict_Check(args[1]) || !PyList_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError,
                        "pump_rows(get_copy_data, relations: dict, changes: list, limit)");
        return NULL;
    }
    Py_ssize_t limit = PyLong_AsSsize_t(args[3]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    PyObject *one = PyLong_FromLong(1), *last = Py_NewRef(Py_None), *pending = NULL;
    Py_ssize_t taken = 0;
    if (one == NULL)
        goto failed;
    while (taken < limit) {
        PyObject *got = PyObject_CallOneArg(args[0], one);
        if (got == NULL)
            goto failed;
        if (!PyTuple_Check(got) || PyTuple_GET_SIZE(got) != 2) {
            Py_DECREF(got);
            PyErr_SetString(PyExc_TypeError, "get_copy_data returned no (nbytes, data)");
            goto failed;
        }
        Py_ssize_t nbytes = PyLong_AsSsize_t(PyTuple_GET_ITEM(got, 0));
        if (nbytes == -1 && PyErr_Occurred()) {
            Py_DECREF(got);
            goto failed;
        }
        int put = nbytes > 0 ? put_one(args[1], args[2], PyTuple_GET_ITEM(got, 1)) : 0;
        if (put < 0) {
            Py_DECREF(got);
            goto failed;
        }
        if (put == 0) {
            pending = got;
            break;
        }
        Py_SETREF(last, Py_NewRef(PyTuple_GET_ITEM(got, 1)));
        Py_DECREF(got);
        taken++;
    }
    Py_DECREF(one);
    PyObject *result = Py_BuildValue("(nNN)", taken, last, pending ? pending : Py_NewRef(Py_None));
    return result;
failed:
    Py_XDECREF(one);
    Py_DECREF(last);
    return NULL;
}

/* ---- JsonRow: TupleData -> JSON object text ---------------------------------------- */

/* QUOTE: the text as a JSON string; RAW: the text is the JSON value; CALL: the text
 * renderer's result. DATE..TIMESTAMPTZ: render.textjson's edit of the text, written here
 * for the shapes that edit accepts (ASCII only), and anything else through the text
 * renderer, as CALL (which then edits or loads it in Python: the same JSON either way). */
enum {
    MODE_QUOTE = 0,
    MODE_RAW = 1,
    MODE_CALL = 2,
    MODE_DATE = 3,
    MODE_TIME = 4,
    MODE_TIMESTAMP = 5,
    MODE_TIMESTAMPTZ = 6,
    MODE_BOOL = 7,       /* t/f: true/false */
    MODE_FLOAT = 8,      /* a JSON number as it is (NaN, Infinity: the text renderer) */
    MODE_JSON = 9,       /* json/jsonb text as it is, unless it holds a line break */
    MODE_INT_ARRAY = 10, /* {1,NULL,{2}} -> [1,null,[2]] */
    MODE_TEXT_ARRAY = 11 /* {a,"b c",NULL} -> ["a","b c",null], as text_array_json */
};
#define MODE_LAST MODE_TEXT_ARRAY

typedef struct {
    PyObject *key;    /* bytes: '"name":' as UTF-8, or NULL when the column is left out */
    int mode;         /* how a text value becomes JSON */
    PyObject *text;   /* callable(bytes) -> str, for MODE_CALL */
    PyObject *binary; /* callable(bytes) -> str, for binary values */
} ColumnPlan;

typedef struct {
    PyObject_HEAD
    Py_ssize_t ncols;
    ColumnPlan *columns;
} JsonRow;

typedef struct {
    char *buf;
    Py_ssize_t len, cap;
    char *heap;
    char stack[4096];
} Out;

/* An empty Out writing into its own stack buffer (to the heap once that is full). */
static void
out_init(Out *o)
{
    o->buf = o->stack;
    o->len = 0;
    o->cap = sizeof(o->stack);
    o->heap = NULL;
}

static int
out_reserve(Out *o, Py_ssize_t extra)
{
    if (o->cap - o->len >= extra)
        return 1;
    Py_ssize_t cap = o->cap;
    while (cap - o->len < extra) {
        if (cap > PY_SSIZE_T_MAX / 2) {
            PyErr_NoMemory();
            return 0;
        }
        cap *= 2;
    }
    char *heap = PyMem_Realloc(o->heap, (size_t)cap);
    if (heap == NULL) {
        PyErr_NoMemory();
        return 0;
    }
    if (o->heap == NULL)
        memcpy(heap, o->stack, (size_t)o->len);
    o->heap = o->buf = heap;
    o->cap = cap;
    return 1;
}

static int
out_put(Out *o, const char *s, Py_ssize_t n)
{
    if (!out_reserve(o, n))
        return 0;
    memcpy(o->buf + o->len, s, (size_t)n);
    o->len += n;
    return 1;
}

/* Writes c at w as JSON string content, escaped exactly as json's encode_basestring
 * (ensure_ascii=False) escapes it: quote, backslash and the C0 controls; every other byte,
 * UTF-8 included, as it is. At most 6 bytes; returns the new end. */
static char *
escape_byte(char *w, unsigned char c)
{
    static const char hex[] = "0123456789abcdef";
    if (c >= 0x20 && c != '"' && c != '\\') {
        *w++ = (char)c;
        return w;
    }
    *w++ = '\\';
    switch (c) {
    case '"': *w++ = '"'; break;
    case '\\': *w++ = '\\'; break;
    case '\n': *w++ = 'n'; break;
    case '\r': *w++ = 'r'; break;
    case '\t': *w++ = 't'; break;
    case '\b': *w++ = 'b'; break;
    case '\f': *w++ = 'f'; break;
    default:
        *w++ = 'u';
        *w++ = '0';
        *w++ = '0';
        *w++ = hex[c >> 4];
        *w++ = hex[c & 0xF];
    }
    return w;
}

/* s as a JSON string (escape_byte's escaping), quotes included; runs of bytes that need no
 * escape (most text: a TOASTed value is kilobytes of them) are copied at once. */
static int
out_quoted(Out *o, const unsigned char *s, Py_ssize_t n)
{
    if (n > (PY_SSIZE_T_MAX - 2) / 6 || !out_reserve(o, 6 * n + 2))
        return 0;
    char *w = o->buf + o->len;
    *w++ = '"';
    Py_ssize_t i = 0;
    while (i < n) {
        Py_ssize_t start = i;
        while (i < n && s[i] >= 0x20 && s[i] != '"' && s[i] != '\\')
            i++;
        memcpy(w, s + start, (size_t)(i - start));
        w += i - start;
        if (i < n)
            w = escape_byte(w, s[i++]);
    }
    *w++ = '"';
    o->len = w - o->buf;
    return 1;
}

/* Calls a renderer; 0 with the exception cleared when it raised an Exception (the caller
 * then steps aside), -1 for anything else (KeyboardInterrupt, MemoryError...). */
static int
out_called(Out *o, PyObject *fn, const unsigned char *s, Py_ssize_t n)
{
    PyObject *arg = PyBytes_FromStringAndSize((const char *)s, n);
    if (arg == NULL)
        return -1;
    PyObject *text = PyObject_CallOneArg(fn, arg);
    Py_DECREF(arg);
    if (text != NULL && !PyUnicode_Check(text)) {
        Py_DECREF(text);
        PyErr_SetString(PyExc_TypeError, "a value renderer must return str");
        text = NULL;
    }
    Py_ssize_t size;
    const char *utf8 = text == NULL ? NULL : PyUnicode_AsUTF8AndSize(text, &size);
    int ok = utf8 != NULL && out_put(o, utf8, size);
    Py_XDECREF(text);
    if (ok)
        return 1;
    if (PyErr_ExceptionMatches(PyExc_Exception)) {
        PyErr_Clear();
        return 0;
    }
    return -1;
}

/* textjson._clock's shape: HH:MM:SS or HH:MM:SS.f (1 to 6 digits), HH below "24" as text. */
static int
clock_shape(const unsigned char *s, Py_ssize_t n)
{
    if (!(n == 8 || (n >= 10 && n <= 15 && s[8] == '.')))
        return 0;
    return s[2] == ':' && s[5] == ':' && (s[0] < '2' || (s[0] == '2' && s[1] < '4'));
}

/* The clock as time.isoformat writes it: six fraction digits, or none. */
static int
out_clock(Out *o, const unsigned char *s, Py_ssize_t n)
{
    if (!out_put(o, (const char *)s, n))
        return 0;
    return n == 8 || out_put(o, "000000", 15 - n);
}

/* One byte of JSON string content (escape_byte). */
static int
out_json_byte(Out *o, unsigned char c)
{
    if (!out_reserve(o, 6))
        return 0;
    o->len = escape_byte(o->buf + o->len, c) - o->buf;
    return 1;
}

/* The code point of the UTF-8 sequence at s[i] (a lead byte >= 0x80) and its length, or 0
 * for a sequence Python's strict decoder refuses (overlong, a surrogate, past U+10FFFF, cut
 * short by n). */
static int
utf8_point(const unsigned char *s, Py_ssize_t n, Py_ssize_t i, Py_UCS4 *cp)
{
    unsigned char c = s[i], lo = 0x80, hi = 0xBF;
    int more;
    if (c >= 0xC2 && c <= 0xDF)
        more = 1;
    else if (c >= 0xE0 && c <= 0xEF) {
        more = 2;
        if (c == 0xE0)
            lo = 0xA0;
        else if (c == 0xED)
            hi = 0x9F;
    }
    else if (c >= 0xF0 && c <= 0xF4) {
        more = 3;
        if (c == 0xF0)
            lo = 0x90;
        else if (c == 0xF4)
            hi = 0x8F;
    }
    else
        return 0;
    if (n - i <= more || s[i + 1] < lo || s[i + 1] > hi)
        return 0;
    Py_UCS4 v = c & (0x7F >> (more + 1));
    for (int k = 1; k <= more; k++) {
        if ((s[i + k] & 0xC0) != 0x80)
            return 0;
        v = (v << 6) | (s[i + k] & 0x3F);
    }
    *cp = v;
    return more + 1;
}

/* \uXXXX for a code point up to U+FFFF. */
static int
out_u_escape(Out *o, Py_UCS4 cp)
{
    static const char hex[] = "0123456789abcdef";
    char e[6] = {'\\', 'u', hex[(cp >> 12) & 0xF], hex[(cp >> 8) & 0xF], hex[(cp >> 4) & 0xF],
                 hex[cp & 0xF]};
    return out_put(o, e, 6);
}

/* The character at s[*i] (UTF-8) as JSON string content, as json's encode_basestring
 * (ascii == 0: non-ASCII bytes copied; the caller's output is checked as UTF-8 as a whole)
 * or encode_basestring_ascii (ascii != 0: \uXXXX, a surrogate pair past U+FFFF) writes it;
 * advances *i past it. 1 written, 0 not UTF-8, -1 out of memory. */
static int
out_json_char(Out *o, const unsigned char *s, Py_ssize_t end, Py_ssize_t *i, int ascii)
{
    unsigned char c = s[*i];
    if (c < 0x7F || (c == 0x7F && !ascii) || (c >= 0x80 && !ascii)) {
        (*i)++;
        return out_json_byte(o, c) ? 1 : -1;
    }
    Py_UCS4 cp = c;
    int len = c == 0x7F ? 1 : utf8_point(s, end, *i, &cp);
    if (len == 0)
        return 0;
    *i += len;
    if (cp < 0x10000)
        return out_u_escape(o, cp) ? 1 : -1;
    Py_UCS4 v = cp - 0x10000;
    return out_u_escape(o, 0xD800 | (v >> 10)) && out_u_escape(o, 0xDC00 | (v & 0x3FF)) ? 1 : -1;
}

/* The elements of PostgreSQL's text output of a one-dimensional array ({a,"b c",NULL}), as
 * UTF-8, written as a JSON array of strings and nulls joined by sep (textarray.json_array).
 * 1 written; 0 declined (o left as it was) for anything textarray.elements refuses (nested
 * arrays, bounds, an element neither bare nor quoted) and for text that is not UTF-8; -1 out
 * of memory. */
static int
out_array_json(Out *o, const unsigned char *s, Py_ssize_t n, int ascii, const char *sep,
               Py_ssize_t seplen)
{
    if (n < 2 || s[0] != '{' || s[n - 1] != '}')
        return 0;
    Py_ssize_t mark = o->len, end = n - 1, i = 1;
    int got = 0;
    if (!out_put(o, "[", 1))
        return -1;
    if (n == 2)
        return out_put(o, "]", 1) ? 1 : -1;
    for (;;) {
        if (i >= end)
            goto decline; /* an empty element: {,a} or {a,} */
        if (s[i] == '"') {
            if (!out_put(o, "\"", 1))
                return -1;
            i++;
            for (;;) {
                if (i >= end)
                    goto decline;
                if (s[i] == '"') {
                    i++;
                    break;
                }
                if (s[i] == '\\' && ++i >= end)
                    goto decline;
                if ((got = out_json_char(o, s, end, &i, ascii)) <= 0)
                    goto failed;
            }
            if (!out_put(o, "\"", 1))
                return -1;
        }
        else {
            Py_ssize_t start = i;
            while (i < end && s[i] != ',') {
                Py_UCS4 cp = s[i];
                int len = 1;
                if (cp >= 0x80 && (len = utf8_point(s, end, i, &cp)) == 0)
                    goto decline;
                if (cp == '{' || cp == '}' || cp == '"' || cp == '\\' || Py_UNICODE_ISSPACE(cp))
                    goto decline;
                i += len;
            }
            if (i == start)
                goto decline; /* {a,,b} */
            if (i - start == 4 && memcmp(s + start, "NULL", 4) == 0) {
                if (!out_put(o, "null", 4))
                    return -1;
            }
            else {
                if (!out_put(o, "\"", 1))
                    return -1;
                for (Py_ssize_t j = start; j < i;)
                    if ((got = out_json_char(o, s, i, &j, ascii)) <= 0)
                        goto failed;
                if (!out_put(o, "\"", 1))
                    return -1;
            }
        }
        if (i == end)
            break;
        if (s[i] != ',')
            goto decline;
        i++;
        if (!out_put(o, sep, seplen))
            return -1;
    }
    return out_put(o, "]", 1) ? 1 : -1;
failed:
    if (got < 0)
        return -1;
decline:
    o->len = mark;
    return 0;
}

/* A JSON number (RFC 8259's grammar), which every finite float PostgreSQL prints is. */
static int
json_number(const unsigned char *s, Py_ssize_t n)
{
    Py_ssize_t i = 0, d;
    if (i < n && s[i] == '-')
        i++;
    if (i >= n)
        return 0;
    if (s[i] == '0')
        i++;
    else if (s[i] >= '1' && s[i] <= '9')
        while (i < n && s[i] >= '0' && s[i] <= '9')
            i++;
    else
        return 0;
    if (i < n && s[i] == '.') {
        d = ++i;
        while (i < n && s[i] >= '0' && s[i] <= '9')
            i++;
        if (i == d)
            return 0;
    }
    if (i < n && (s[i] == 'e' || s[i] == 'E')) {
        i++;
        if (i < n && (s[i] == '+' || s[i] == '-'))
            i++;
        d = i;
        while (i < n && s[i] >= '0' && s[i] <= '9')
            i++;
        if (i == d)
            return 0;
    }
    return i == n;
}

/* Whether s could be an integer array's text: '{' first, then only digits, '-', ',', braces
 * and NULL's letters (not explicit bounds, not quotes). */
static int
int_array_chars(const unsigned char *s, Py_ssize_t n)
{
    if (n < 1 || s[0] != '{')
        return 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = s[i];
        if (!((c >= '0' && c <= '9') || c == '-' || c == ',' || c == '{' || c == '}' ||
              c == 'N' || c == 'U' || c == 'L'))
            return 0;
    }
    return 1;
}

/* An integer array's text as JSON at w ({1,NULL,{2}} -> [1,null,[2]]; ", " between
 * elements when spaced): at most 2n bytes; returns the new end. */
static char *
int_array_write(char *w, const unsigned char *s, Py_ssize_t n, int spaced)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = s[i];
        if (c == 'N' && n - i >= 4 && memcmp(s + i, "NULL", 4) == 0) {
            memcpy(w, "null", 4);
            w += 4;
            i += 3;
        }
        else if (c == ',' && spaced) {
            *w++ = ',';
            *w++ = ' ';
        }
        else
            *w++ = c == '{' ? '[' : c == '}' ? ']' : (char)c;
    }
    return w;
}

/* MODE_INT_ARRAY: jsonl._integer_array's edit. */
static int
out_int_array(Out *o, const unsigned char *s, Py_ssize_t n)
{
    if (!int_array_chars(s, n))
        return 0;
    if (!out_reserve(o, n))
        return -1;
    o->len = int_array_write(o->buf + o->len, s, n, 0) - o->buf;
    return 1;
}

/* The native modes (MODE_DATE..MODE_LAST): 1 written, 0 not this mode's shape (the caller
 * renders through Python), -1 out of memory. */
static int
out_edited(Out *o, int mode, const unsigned char *s, Py_ssize_t n)
{
    switch (mode) {
    case MODE_BOOL:
        if (n != 1 || (s[0] != 't' && s[0] != 'f'))
            return 0;
        return (s[0] == 't' ? out_put(o, "true", 4) : out_put(o, "false", 5)) ? 1 : -1;
    case MODE_FLOAT:
        if (!json_number(s, n))
            return 0;
        return out_put(o, (const char *)s, n) ? 1 : -1;
    case MODE_JSON:
        if (memchr(s, '\n', (size_t)n) != NULL || memchr(s, '\r', (size_t)n) != NULL)
            return 0;
        return out_put(o, (const char *)s, n) ? 1 : -1;
    case MODE_INT_ARRAY:
        return out_int_array(o, s, n);
    case MODE_TEXT_ARRAY:
        return out_array_json(o, s, n, 0, ",", 1);
    default:
        break;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (s[i] >= 0x80)
            return 0;
    int ok;
    switch (mode) {
    case MODE_DATE:
        if (n != 10 || s[4] != '-' || s[7] != '-')
            return 0;
        ok = out_put(o, "\"", 1) && out_put(o, (const char *)s, n) && out_put(o, "\"", 1);
        break;
    case MODE_TIME:
        if (!clock_shape(s, n))
            return 0;
        ok = out_put(o, "\"", 1) && out_clock(o, s, n) && out_put(o, "\"", 1);
        break;
    case MODE_TIMESTAMP:
        if (n < 19 || s[4] != '-' || s[10] != ' ' || !clock_shape(s + 11, n - 11))
            return 0;
        ok = out_put(o, "\"", 1) && out_put(o, (const char *)s, 10) && out_put(o, "T", 1) &&
             out_clock(o, s + 11, n - 11) && out_put(o, "\"", 1);
        break;
    case MODE_TIMESTAMPTZ:
        if (n < 22 || memcmp(s + n - 3, "+00", 3) != 0 || s[4] != '-' || s[10] != ' ' ||
            !clock_shape(s + 11, n - 14))
            return 0;
        ok = out_put(o, "\"", 1) && out_put(o, (const char *)s, 10) && out_put(o, "T", 1) &&
             out_clock(o, s + 11, n - 14) && out_put(o, "+00:00\"", 7);
        break;
    default:
        return 0;
    }
    return ok ? 1 : -1;
}

/* Whether s is UTF-8 as Python's strict decoder reads it (utf8_point's rules). */
static int
utf8_valid(const unsigned char *s, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    while (i < n) {
        if (s[i] < 0x80) {
            /* ASCII: eight bytes at a time while no byte has its top bit set */
            uint64_t word;
            i++;
            while (n - i >= 8) {
                memcpy(&word, s + i, 8);
                if (word & 0x8080808080808080ULL)
                    break;
                i += 8;
            }
            continue;
        }
        Py_UCS4 cp;
        int len = utf8_point(s, n, i, &cp);
        if (len == 0)
            return 0;
        i += len;
    }
    return 1;
}

/* Renders the TupleData at buf[pos:] into out: 1 done, 0 irregular (the caller steps aside),
 * -1 with an exception set. */
static int
json_row_render(JsonRow *self, const unsigned char *data, Py_ssize_t len, Py_ssize_t pos, Out *out)
{
    int first = 1;
    if (!read_count(data, len, pos, self->ncols))
        return 0;
    pos += 2;
    if (!out_put(out, "{", 1))
        return -1;
    for (Py_ssize_t i = 0; i < self->ncols; i++) {
        ColumnPlan *col = &self->columns[i];
        int kind, got = 1;
        Py_ssize_t start, size;
        if (!next_value(data, len, &pos, &kind, &start, &size))
            return 0;
        if (kind != KIND_TEXT && kind != KIND_BINARY && kind != KIND_NULL)
            return 0; /* unchanged TOAST, or garbage */
        if (col->key == NULL)
            continue;
        if ((!first && !out_put(out, ",", 1)) ||
            !out_put(out, PyBytes_AS_STRING(col->key), PyBytes_GET_SIZE(col->key)))
            return -1;
        first = 0;
        const unsigned char *value = data + start;
        if (kind == KIND_NULL)
            got = out_put(out, "null", 4);
        else if (kind == KIND_BINARY)
            got = out_called(out, col->binary, value, size);
        else if (col->mode == MODE_QUOTE)
            got = out_quoted(out, value, size);
        else if (col->mode == MODE_RAW)
            got = out_put(out, (const char *)value, size);
        else if (col->mode == MODE_CALL ||
                 (got = out_edited(out, col->mode, value, size)) == 0)
            got = out_called(out, col->text, value, size);
        if (got == 0 && !PyErr_Occurred())
            return 0;
        if (got <= 0)
            return -1;
    }
    return out_put(out, "}", 1) ? 1 : -1;
}

/* The row as JSON text: str (utf8 == 0) or UTF-8 bytes; None for an irregular row or text
 * that is not UTF-8 (the careful path reports it). */
static PyObject *
json_row_output(JsonRow *self, PyObject *buf_obj, Py_ssize_t pos, int utf8)
{
    Py_buffer view;
    if (PyObject_GetBuffer(buf_obj, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Out out;
    out_init(&out);
    PyObject *result = NULL;
    int done = json_row_render(self, view.buf, view.len, pos, &out);
    if (done == 1 && utf8) {
        if (utf8_valid((const unsigned char *)out.buf, out.len))
            result = PyBytes_FromStringAndSize(out.buf, out.len);
        else
            done = 0;
    }
    else if (done == 1) {
        result = PyUnicode_DecodeUTF8(out.buf, out.len, NULL);
        if (result == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
            PyErr_Clear();
            done = 0;
        }
    }
    if (done == 0)
        result = Py_NewRef(Py_None);
    PyMem_Free(out.heap);
    PyBuffer_Release(&view);
    return result;
}

static PyObject *
JsonRow_call(JsonRow *self, PyObject *args, PyObject *kwargs)
{
    PyObject *buf_obj;
    Py_ssize_t pos;
    if (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0) {
        PyErr_SetString(PyExc_TypeError, "JsonRow takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "On", &buf_obj, &pos))
        return NULL;
    return json_row_output(self, buf_obj, pos, 0);
}

/* JsonRow.utf8(buf, pos): the same JSON as calling it, as UTF-8 bytes. */
static PyObject *
JsonRow_utf8(JsonRow *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t pos;
    if (nargs != 2 || (pos = PyLong_AsSsize_t(args[1])) == -1) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "utf8(buf, pos)");
        return NULL;
    }
    return json_row_output(self, args[0], pos, 1);
}

static PyMethodDef JsonRow_methods[] = {
    {"utf8", (PyCFunction)(void (*)(void))JsonRow_utf8, METH_FASTCALL,
     PyDoc_STR("utf8(buf, pos) -> bytes | None: the JSON object as UTF-8")},
    {NULL, NULL, 0, NULL},
};

static void
JsonRow_clear_columns(JsonRow *self)
{
    if (self->columns == NULL)
        return;
    for (Py_ssize_t i = 0; i < self->ncols; i++) {
        Py_CLEAR(self->columns[i].key);
        Py_CLEAR(self->columns[i].text);
        Py_CLEAR(self->columns[i].binary);
    }
    PyMem_Free(self->columns);
    self->columns = NULL;
    self->ncols = 0;
}

/* JsonRow(columns): columns is a sequence of (key: str | None, mode: int, text, binary). */
static int
JsonRow_init(JsonRow *self, PyObject *args, PyObject *kwargs)
{
    PyObject *spec;
    static char *kwlist[] = {"columns", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O", kwlist, &spec))
        return -1;
    if (self->columns != NULL) {
        /* a renderer running inside __call__ could otherwise free the plan it walks */
        PyErr_SetString(PyExc_TypeError, "a JsonRow is initialised once");
        return -1;
    }
    PyObject *seq = PySequence_Fast(spec, "columns must be a sequence");
    if (seq == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > 0xFFFF) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "a relation has at most 65535 columns");
        return -1;
    }
    self->columns = PyMem_Calloc(n ? (size_t)n : 1, sizeof(ColumnPlan));
    if (self->columns == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    self->ncols = n;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *key, *text, *binary;
        int mode;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "OiOO;a column is (key, mode, "
                              "text, binary)", &key, &mode, &text, &binary))
            goto fail;
        ColumnPlan *col = &self->columns[i];
        if (mode < MODE_QUOTE || mode > MODE_LAST || !PyCallable_Check(binary) ||
            (mode >= MODE_CALL && !PyCallable_Check(text))) {
            PyErr_SetString(PyExc_ValueError, "bad column plan");
            goto fail;
        }
        if (key != Py_None) {
            col->key = PyUnicode_AsUTF8String(key);
            if (col->key == NULL)
                goto fail;
        }
        col->mode = mode;
        col->text = Py_NewRef(text);
        col->binary = Py_NewRef(binary);
    }
    Py_DECREF(seq);
    return 0;
fail:
    Py_DECREF(seq);
    JsonRow_clear_columns(self);
    return -1;
}

static int
JsonRow_traverse(JsonRow *self, visitproc visit, void *arg)
{
    for (Py_ssize_t i = 0; i < self->ncols; i++) {
        Py_VISIT(self->columns[i].text);
        Py_VISIT(self->columns[i].binary);
    }
    return 0;
}

static int
JsonRow_clear(JsonRow *self)
{
    JsonRow_clear_columns(self);
    return 0;
}

static void
JsonRow_dealloc(JsonRow *self)
{
    PyObject_GC_UnTrack(self);
    JsonRow_clear_columns(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject JsonRowType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pglogrepl_bridge._fastrow.JsonRow",
    .tp_doc = PyDoc_STR("JsonRow(columns)(buf, pos) -> JSON object text, or None to step aside"),
    .tp_basicsize = sizeof(JsonRow),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)JsonRow_init,
    .tp_call = (ternaryfunc)JsonRow_call,
    .tp_methods = JsonRow_methods,
    .tp_traverse = (traverseproc)JsonRow_traverse,
    .tp_clear = (inquiry)JsonRow_clear,
    .tp_dealloc = (destructor)JsonRow_dealloc,
};

/* copy_row(line, ncols) -> list | None
 *
 * One row of COPY TO's text output (tab-separated, an optional newline at the end) as its
 * values: bytes, or None for a field that is exactly \N. COPY TO escapes a backslash,
 * backspace, form feed, newline, carriage return, tab and vertical tab as \\ \b \f \n \r \t
 * \v; those are undone. None (the caller takes copytext.split_row, which says what is wrong)
 * for a row without ncols fields or with any other escape. */
static PyObject *
copy_row(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "copy_row(line: bytes, ncols: int)");
        return NULL;
    }
    Py_ssize_t ncols = PyLong_AsSsize_t(args[1]);
    if (ncols == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *data = view.buf;
    Py_ssize_t len = view.len;
    if (len > 0 && data[len - 1] == '\n')
        len--;
    PyObject *values = ncols > 0 ? PyList_New(ncols) : NULL;
    PyObject *result = NULL;
    char *buf = NULL;
    if (values == NULL) {
        if (ncols > 0)
            goto done; /* out of memory */
        result = Py_NewRef(Py_None);
        goto done;
    }
    Py_ssize_t field = 0, start = 0;
    for (Py_ssize_t at = 0; at <= len; at++) {
        if (at < len && data[at] != '\t')
            continue;
        if (field >= ncols) /* too many fields */
            goto irregular;
        Py_ssize_t size = at - start;
        const unsigned char *text = data + start;
        PyObject *value;
        if (size == 2 && text[0] == '\\' && text[1] == 'N')
            value = Py_NewRef(Py_None);
        else if (memchr(text, '\\', (size_t)size) == NULL)
            value = PyBytes_FromStringAndSize((const char *)text, size);
        else {
            if (buf == NULL && (buf = PyMem_Malloc((size_t)len + 1)) == NULL) {
                PyErr_NoMemory();
                goto fail;
            }
            Py_ssize_t n = 0;
            for (Py_ssize_t i = 0; i < size; i++) {
                unsigned char c = text[i];
                if (c == '\\') {
                    if (++i >= size)
                        goto irregular;
                    switch (text[i]) {
                    case '\\': c = '\\'; break;
                    case 'b': c = '\b'; break;
                    case 'f': c = '\f'; break;
                    case 'n': c = '\n'; break;
                    case 'r': c = '\r'; break;
                    case 't': c = '\t'; break;
                    case 'v': c = '\v'; break;
                    default: goto irregular; /* \N inside a field, octal, hex: not COPY TO's */
                    }
                }
                buf[n++] = (char)c;
            }
            value = PyBytes_FromStringAndSize(buf, n);
        }
        if (value == NULL)
            goto fail;
        PyList_SET_ITEM(values, field++, value);
        start = at + 1;
    }
    if (field != ncols)
        goto irregular;
    result = values;
    values = NULL;
    goto done;
irregular:
    result = Py_NewRef(Py_None);
fail:
    Py_XDECREF(values);
    values = NULL;
done:
    Py_XDECREF(values);
    PyMem_Free(buf);
    PyBuffer_Release(&view);
    return result;
}

/* ---- a one-dimensional array's text output as a JSON array (textarray.json_array) ------ */

/* text_array_json(text, ascii, separator) -> str | None: out_array_json for a str; None
 * where it declines, and for a str that is not UTF-8 (a lone surrogate), which the caller
 * then hands to Python. */
static PyObject *
text_array_json(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyUnicode_Check(args[0]) || !PyUnicode_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "text_array_json(text: str, ascii, separator: str)");
        return NULL;
    }
    int ascii = PyObject_IsTrue(args[1]);
    if (ascii < 0)
        return NULL;
    Py_ssize_t seplen, n;
    const char *sep = PyUnicode_AsUTF8AndSize(args[2], &seplen);
    if (sep == NULL)
        return NULL;
    const char *text = PyUnicode_AsUTF8AndSize(args[0], &n);
    if (text == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError))
            return NULL;
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    Out out;
    out_init(&out);
    PyObject *result = NULL;
    int done = out_array_json(&out, (const unsigned char *)text, n, ascii, sep, seplen);
    if (done == 1)
        result = PyUnicode_DecodeUTF8(out.buf, out.len, NULL);
    else if (done == 0)
        result = Py_NewRef(Py_None);
    PyMem_Free(out.heap);
    return result;
}

/* int_array_json(text) -> str: an integer array's text output as JSON, as
 * sqlitetext.integer_array writes it ({1,NULL,{2}} -> [1, null, [2]]); any
 * character an integer array never prints (explicit bounds, quotes) raises ValueError, and the caller takes the loader's path. */
static PyObject *
int_array_json(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 1 || !PyUnicode_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "int_array_json(text: str)");
        return NULL;
    }
    PyObject *text = args[0];
    const unsigned char *in = (const unsigned char *)PyUnicode_DATA(text);
    Py_ssize_t n = PyUnicode_GET_LENGTH(text);
    if (!PyUnicode_IS_ASCII(text) || !int_array_chars(in, n)) {
        PyErr_SetString(PyExc_ValueError, "not an integer array's text output");
        return NULL;
    }
    if (n > PY_SSIZE_T_MAX / 2)
        return PyErr_NoMemory();
    char *out = PyMem_Malloc((size_t)(2 * n));
    if (out == NULL)
        return PyErr_NoMemory();
    Py_ssize_t o = int_array_write(out, in, n, 1) - out;
    PyObject *result = PyUnicode_DecodeASCII(out, o, NULL);
    PyMem_Free(out);
    return result;
}

/* ipv4_int(data) -> int | None: a dotted quad as PostgreSQL prints an IPv4 address (four
 * decimal octets, no leading zeros, nothing else) as its integer, or None for anything else
 * (a prefix, IPv6), which loaders.py hands to ipaddress. Takes any bytes-like value, so the
 * inet loader needs no str. */
static PyObject *
ipv4_int(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 1) {
        PyErr_SetString(PyExc_TypeError, "ipv4_int(data: bytes-like)");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *in = (const unsigned char *)view.buf;
    Py_ssize_t n = view.len, i = 0;
    uint32_t value = 0;
    int ok = n >= 7 && n <= 15;
    for (int part = 0; ok && part < 4; part++) {
        if (part > 0) {
            if (i >= n || in[i] != '.') {
                ok = 0;
                break;
            }
            i++;
        }
        Py_ssize_t start = i;
        unsigned int octet = 0;
        while (i < n && i - start < 3 && in[i] >= '0' && in[i] <= '9')
            octet = octet * 10 + (unsigned int)(in[i++] - '0');
        /* one to three digits, no leading zero (ipaddress refuses them too), at most 255 */
        if (i == start || (in[start] == '0' && i - start > 1) || octet > 255)
            ok = 0;
        value = value << 8 | octet;
    }
    ok = ok && i == n;
    PyBuffer_Release(&view);
    if (!ok)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLong(value);
}

/* digit_run(data, length) -> bool: whether data (str or bytes-like) holds `length` ASCII
 * digits in a row; the JSON loader's test for integers orjson would read as floats (the
 * regex it replaces cost more than orjson's parse of a small document). */
static PyObject *
digit_run(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t want;
    if (nargs != 2 || (want = PyLong_AsSsize_t(args[1])) < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "digit_run(data: str | bytes-like, length: int)");
        return NULL;
    }
    Py_ssize_t run = 0;
    int found = want == 0;
    if (PyUnicode_Check(args[0])) {
        PyObject *text = args[0];
        int kind = PyUnicode_KIND(text);
        const void *data = PyUnicode_DATA(text);
        Py_ssize_t n = PyUnicode_GET_LENGTH(text);
        for (Py_ssize_t i = 0; i < n && !found; i++) {
            Py_UCS4 c = PyUnicode_READ(kind, data, i);
            run = (c >= '0' && c <= '9') ? run + 1 : 0;
            found = run >= want;
        }
    }
    else {
        Py_buffer view;
        if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
            return NULL;
        const unsigned char *in = (const unsigned char *)view.buf;
        for (Py_ssize_t i = 0; i < view.len && !found; i++) {
            run = (in[i] >= '0' && in[i] <= '9') ? run + 1 : 0;
            found = run >= want;
        }
        PyBuffer_Release(&view);
    }
    return PyBool_FromLong(found);
}

/* copy_text(ncols, buf, pos) -> bytes | None
 *
 * The TupleData at buf[pos:] as one line of COPY text: its text values as the server printed
 * them, escaped as psycopg's Copy.write_row escapes a str (backslash, \b \t \n \v \f \r),
 * NULL as \N, tab-separated, '\n' at the end. A PostgreSQL target reads each value with its
 * type's input function, as it reads the str the sink would bind. None for a binary or
 * unchanged-TOAST value, a NUL byte, or irregular bytes: the sink then converts the row. */
static PyObject *
copy_text(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "copy_text(ncols, buf, pos)");
        return NULL;
    }
    Py_ssize_t ncols = PyLong_AsSsize_t(args[0]);
    if (ncols == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t pos;
    Py_buffer view;
    if (!buffer_at(args[1], args[2], &view, &pos))
        return NULL;
    const unsigned char *data = view.buf;
    Py_ssize_t len = view.len;
    PyObject *result = NULL;
    Out out;
    out_init(&out);
    if (ncols < 1 || !read_count(data, len, pos, ncols))
        goto declined;
    pos += 2;
    for (Py_ssize_t i = 0; i < ncols; i++) {
        int kind;
        Py_ssize_t start, size;
        if (!next_value(data, len, &pos, &kind, &start, &size))
            goto declined;
        if (i > 0 && !out_put(&out, "\t", 1))
            goto done;
        if (kind == KIND_NULL) {
            if (!out_put(&out, "\\N", 2))
                goto done;
            continue;
        }
        if (kind != KIND_TEXT)
            goto declined;
        if (!out_reserve(&out, 2 * size))
            goto done;
        const unsigned char *v = data + start;
        char *w = out.buf + out.len;
        Py_ssize_t run = 0;
        for (Py_ssize_t j = 0; j < size; j++) {
            unsigned char c = v[j];
            char e;
            switch (c) {
            case '\\': e = '\\'; break;
            case '\b': e = 'b'; break;
            case '\t': e = 't'; break;
            case '\n': e = 'n'; break;
            case '\v': e = 'v'; break;
            case '\f': e = 'f'; break;
            case '\r': e = 'r'; break;
            case '\0': goto declined; /* no text value holds one: psycopg refuses it */
            default: continue;
            }
            memcpy(w, v + run, (size_t)(j - run));
            w += j - run;
            *w++ = '\\';
            *w++ = e;
            run = j + 1;
        }
        memcpy(w, v + run, (size_t)(size - run));
        w += size - run;
        out.len = w - out.buf;
    }
    if (!out_put(&out, "\n", 1))
        goto done;
    result = PyBytes_FromStringAndSize(out.buf, out.len);
    goto done;
declined:
    result = Py_NewRef(Py_None);
done:
    PyMem_Free(out.heap);
    PyBuffer_Release(&view);
    return result;
}

/* ---- a batch's row changes held for the SQL sink's reduction (sinks.reduce) ------------
 *
 * SqlSink._hold, then Reduction.add, for a run of changes in one call: per change that is
 * a frame and a dozen attribute reads in Python, about a microsecond, which the writer
 * thread spent on every change of a batch. hold_rows does what the Python pair does and
 * stops, untouched, at the first change it leaves to them (anything but the plain case:
 * a relation without a target yet or without a key, an unchanged-TOAST row to convert, a
 * key change, a transition the rules lack). The rules stay in Python: the transitions are
 * reduce._NEXT itself, and merging is Reduction's merge. */

enum { H_STATE, H_NEW, H_KEY, H_LAST, N_HELD };

static PyTypeObject *held_type = NULL;
static Py_ssize_t held_offsets[N_HELD];
static PyObject *str_hold = NULL;

/* bind_held(cls, fields): reduce.Held, its slots state, new, key and last in that order. */
static PyObject *
bind_held(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyType_Check(args[0]) || !PyTuple_Check(args[1]) ||
        PyTuple_GET_SIZE(args[1]) != N_HELD) {
        PyErr_SetString(PyExc_TypeError, "bind_held(cls, fields: 4-tuple)");
        return NULL;
    }
    Py_ssize_t offsets[N_HELD];
    if (!slot_offsets(args[0], args[1], N_HELD, offsets))
        return NULL;
    memcpy(held_offsets, offsets, sizeof(offsets));
    Py_XSETREF(held_type, (PyTypeObject *)Py_NewRef(args[0]));
    Py_RETURN_NONE;
}

#define SLOT(obj, offsets, field) (*(PyObject **)((char *)(obj) + (offsets)[field]))

/* Replaces a Held slot's value (steals value). */
static void
held_set(PyObject *held, int field, PyObject *value)
{
    PyObject **at = &SLOT(held, held_offsets, field);
    PyObject *old = *at;
    *at = value;
    Py_XDECREF(old);
}

/* Whether op is the interned operation name op_x (or an equal str). */
static int
is_op(PyObject *op, PyObject *name)
{
    return op == name || (PyUnicode_Check(op) && PyUnicode_Compare(op, name) == 0);
}

/* One change through _hold and add: 1 held, 0 left to Python (nothing changed), -1 error;
 * *added counts a new row. */
static int
hold_one(PyObject *targets, PyObject *by_name, PyObject *tables, PyObject *transitions,
         PyObject *merge, PyObject *change, int *added)
{
    if (Py_TYPE(change) != row_change_type)
        return 0;
    PyObject *target = PyDict_GetItemWithError(targets, SLOT(change, row_offsets, F_RELATION));
    if (target == NULL)
        return PyErr_Occurred() ? -1 : 0;
    PyObject *hold = PyObject_GetAttr(target, str_hold); /* (name, indexes, ncols) | None */
    if (hold == NULL)
        return -1;
    int result = 0;
    PyObject *key = NULL, *old = NULL, *state_key = NULL;
    if (!PyTuple_Check(hold) || PyTuple_GET_SIZE(hold) != 3)
        goto done; /* keyless */
    PyObject *name = PyTuple_GET_ITEM(hold, 0), *indexes = PyTuple_GET_ITEM(hold, 1);
    Py_ssize_t ncols = PyLong_AsSsize_t(PyTuple_GET_ITEM(hold, 2));
    if ((ncols == -1 && PyErr_Occurred()) || !PyTuple_Check(indexes))
        goto failed;
    PyObject *first = PyDict_SetDefault(by_name, name, target); /* held.setdefault */
    if (first == NULL)
        goto failed;
    if (first != target)
        goto done; /* the table's relation changed in the batch */
    PyObject *raw = SLOT(change, row_offsets, F_RAW), *op = SLOT(change, row_offsets, F_OP);
    if (!PyBytes_CheckExact(raw))
        goto done;
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(raw);
    Py_ssize_t len = PyBytes_GET_SIZE(raw);
    Py_ssize_t new_at = PyLong_AsSsize_t(SLOT(change, row_offsets, F_NEW_AT));
    Py_ssize_t old_at = PyLong_AsSsize_t(SLOT(change, row_offsets, F_OLD_AT));
    if (PyErr_Occurred())
        goto failed;
    int complete, is_delete = is_op(op, op_delete);
    PyObject *new = NULL; /* borrowed: the change itself, or none for a delete */
    if (is_delete) {
        if (old_at < 0)
            goto done;
        key = read_key(indexes, ncols, data, len, old_at, &complete);
    }
    else {
        key = read_key(indexes, ncols, data, len, new_at, &complete);
        new = change;
    }
    if (key == NULL)
        goto failed;
    if (key == Py_None)
        goto done;
    if (!is_delete) {
        if (!complete)
            goto done; /* converted by _hold */
        if (old_at >= 0) {
            int old_complete, same;
            old = read_key(indexes, ncols, data, len, old_at, &old_complete);
            if (old == NULL || (old != Py_None && (same = PyObject_RichCompareBool(old, key, Py_EQ)) < 0))
                goto failed;
            if (old == Py_None || !same)
                goto done; /* the key changed */
        }
    }
    /* Reduction.add(name, op, key, new, change) */
    PyObject *rows = PyDict_GetItemWithError(tables, name);
    if (rows == NULL) {
        if (PyErr_Occurred())
            goto failed;
        PyObject *made = PyDict_New();
        if (made == NULL || PyDict_SetItem(tables, name, made) < 0) {
            Py_XDECREF(made);
            goto failed;
        }
        rows = made;
        Py_DECREF(made); /* tables holds it */
    }
    PyObject *held = PyDict_GetItemWithError(rows, key);
    if (held == NULL && PyErr_Occurred())
        goto failed;
    if (held != NULL && Py_TYPE(held) != held_type)
        goto done;
    state_key = PyTuple_Pack(2, held != NULL ? SLOT(held, held_offsets, H_STATE) : Py_None, op);
    if (state_key == NULL)
        goto failed;
    PyObject *state = PyDict_GetItemWithError(transitions, state_key);
    if (state == NULL) {
        if (PyErr_Occurred())
            goto failed;
        goto done; /* not reducible: add returns False */
    }
    if (held == NULL) {
        PyObject *made = held_type->tp_alloc(held_type, 0);
        if (made == NULL)
            goto failed;
        PyObject *value = new != NULL ? Py_NewRef(new) : PyDict_New();
        if (value == NULL) {
            Py_DECREF(made);
            goto failed;
        }
        SLOT(made, held_offsets, H_STATE) = Py_NewRef(state);
        SLOT(made, held_offsets, H_NEW) = value;
        SLOT(made, held_offsets, H_KEY) = Py_NewRef(key);
        SLOT(made, held_offsets, H_LAST) = Py_NewRef(change);
        int set = PyDict_SetItem(rows, key, made);
        Py_DECREF(made);
        if (set < 0)
            goto failed;
        *added += 1;
        result = 1;
        goto done;
    }
    Py_INCREF(held);
    if (new != NULL && is_op(op, op_update)) { /* rule 2: over the earlier columns */
        PyObject *merged = PyObject_CallFunctionObjArgs(
            merge, SLOT(held, held_offsets, H_NEW), new, NULL);
        if (merged == NULL) {
            Py_DECREF(held);
            goto failed;
        }
        held_set(held, H_NEW, merged);
    }
    else if (new != NULL && is_op(op, op_insert))
        held_set(held, H_NEW, Py_NewRef(new));
    held_set(held, H_STATE, Py_NewRef(state));
    held_set(held, H_LAST, Py_NewRef(change));
    /* popped and put back: rows stay in the order of their last changes */
    int moved = PyDict_DelItem(rows, key) == 0 && PyDict_SetItem(rows, key, held) == 0;
    Py_DECREF(held);
    if (!moved)
        goto failed;
    result = 1;
    goto done;
failed:
    result = -1;
done:
    Py_DECREF(hold);
    Py_XDECREF(key);
    Py_XDECREF(old);
    Py_XDECREF(state_key);
    return result;
}

/* hold_rows(targets, held, tables, transitions, merge, changes, start, room)
 *     -> (index, added)
 *
 * Holds changes[start:] (a list or tuple) as SqlSink._hold would, one after the other, and
 * returns the index of the first one it leaves to Python (len(changes) when none), and how
 * many new rows it held; it stops after the change that makes ``room`` new rows. targets
 * is the sink's {relation: _Target} (each with ``hold``: (table name, key column indexes,
 * column count), or None for a keyless table), held its {table name: _Target} of the
 * batch, tables the Reduction's {table: {key: Held}}, transitions reduce._NEXT, merge the
 * Reduction's merge. */
static PyObject *
hold_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 8 || !PyDict_Check(args[0]) || !PyDict_Check(args[1]) ||
        !PyDict_Check(args[2]) || !PyDict_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "hold_rows(targets: dict, held: dict, tables: dict, "
                                         "transitions: dict, merge, changes, start, room)");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[6]), room = PyLong_AsSsize_t(args[7]);
    if (PyErr_Occurred())
        return NULL;
    PyObject *changes = args[5];
    Py_ssize_t i = start < 0 ? 0 : start;
    int added = 0;
    if ((PyList_CheckExact(changes) || PyTuple_CheckExact(changes)) && row_change_type != NULL &&
        held_type != NULL) {
        PyObject **items = PySequence_Fast_ITEMS(changes);
        Py_ssize_t n = PySequence_Fast_GET_SIZE(changes);
        while (i < n && added < room) {
            PyObject *change = Py_NewRef(items[i]); /* merge may run Python */
            int got = hold_one(args[0], args[1], args[2], args[3], args[4], change, &added);
            Py_DECREF(change);
            if (got < 0)
                return NULL;
            if (got == 0)
                break;
            i++;
            if (PyList_CheckExact(changes)) { /* a list could have changed under merge */
                items = PySequence_Fast_ITEMS(changes);
                n = PySequence_Fast_GET_SIZE(changes);
            }
        }
    }
    return Py_BuildValue("(ni)", i, added);
}

/* ---- a row's values as SQLite's driver takes them (sinks.sql into SQLite) ------------- */

/* How driver_row converts one text value (``_accel.DRIVER_*``); a column whose plan entry is
 * a callable gets that callable's result for the value's bytes instead. Each mode gives what
 * the sink's Python path gives for the same text (psycopg's loader, then the column's bind
 * processor, or the ``sinks.sqlitetext`` edit that stands for both), or declines. */
enum {
    D_TEXT = 0,        /* str: the text, strict UTF-8 */
    D_INT = 1,         /* int: [-]digits */
    D_FLOAT = 2,       /* float: float() of the text (NaN, Infinity too) */
    D_BOOL = 3,        /* int 1 for t, 0 for f: SQLAlchemy's Boolean on SQLite */
    D_BYTEA = 4,       /* bytes: \x and hex digits */
    D_TIMESTAMP = 5,   /* sqlitetext.timestamp */
    D_TIMESTAMPTZ = 6, /* sqlitetext.timestamptz */
    D_DATE = 7,        /* sqlitetext.date */
    D_TIME = 8,        /* sqlitetext.time */
    D_TIMETZ = 9,      /* sqlitetext.timetz */
    D_UUID = 10,       /* sqlitetext.uuid: the 32 hex digits */
    D_INT_ARRAY = 11,  /* sqlitetext.integer_array */
    D_TEXT_ARRAY = 12  /* sqlitetext.text_array */
};
#define D_LAST D_TEXT_ARRAY

static int
all_ascii(const unsigned char *s, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        if (s[i] >= 0x80)
            return 0;
    return 1;
}

/* sqlitetext.timestamp's edit of s (ASCII) into w (27 bytes): its length, or 0 to decline. */
static Py_ssize_t
edit_timestamp(char *w, const unsigned char *s, Py_ssize_t n)
{
    if (n < 19 || s[4] != '-' || s[10] != ' ')
        return 0;
    if (n == 19) {
        memcpy(w, s, 19);
        memcpy(w + 19, ".000000", 7);
        return 26;
    }
    if (n < 21 || n > 26 || s[19] != '.')
        return 0;
    memcpy(w, s, (size_t)n);
    memset(w + n, '0', (size_t)(26 - n));
    return 26;
}

/* sqlitetext.time's edit: the same tests, in the same order. */
static Py_ssize_t
edit_time(char *w, const unsigned char *s, Py_ssize_t n)
{
    /* text[:2] < "24" and text[2:3] == ":" */
    if (n < 3 || !(s[0] < '2' || (s[0] == '2' && s[1] < '4')) || s[2] != ':')
        return 0;
    if (n == 8) {
        memcpy(w, s, 8);
        memcpy(w + 8, ".000000", 7);
        return 15;
    }
    if (n < 10 || n > 15 || s[8] != '.')
        return 0;
    memcpy(w, s, (size_t)n);
    memset(w + n, '0', (size_t)(15 - n));
    return 15;
}

/* A plain integer's text ([-]digits) as an int; Py_None (new) to decline. */
static PyObject *
driver_int(const unsigned char *s, Py_ssize_t n)
{
    Py_ssize_t i = n > 0 && s[0] == '-' ? 1 : 0;
    if (n - i < 1 || n > 40)
        return Py_NewRef(Py_None);
    long long v = 0;
    for (Py_ssize_t j = i; j < n; j++) {
        if (s[j] < '0' || s[j] > '9')
            return Py_NewRef(Py_None);
        if (n - i <= 18)
            v = v * 10 + (s[j] - '0');
    }
    if (n - i <= 18)
        return PyLong_FromLongLong(i ? -v : v);
    char text[41];
    memcpy(text, s, (size_t)n);
    text[n] = '\0';
    return PyLong_FromString(text, NULL, 10);
}

/* float() of the text; Py_None (new) to decline. */
static PyObject *
driver_float(const unsigned char *s, Py_ssize_t n)
{
    char text[64], *end;
    if (n >= (Py_ssize_t)sizeof(text) || !all_ascii(s, n))
        return Py_NewRef(Py_None);
    memcpy(text, s, (size_t)n);
    text[n] = '\0';
    double d = PyOS_string_to_double(text, &end, NULL);
    if (d == -1.0 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_ValueError))
            return NULL;
        PyErr_Clear();
        return Py_NewRef(Py_None);
    }
    if (end != text + n)
        return Py_NewRef(Py_None);
    return PyFloat_FromDouble(d);
}

static int
hex_digit(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* bytea's hex output (\x then pairs of hex digits) as bytes; Py_None (new) to decline. */
static PyObject *
driver_bytea(const unsigned char *s, Py_ssize_t n)
{
    if (n < 2 || s[0] != '\\' || s[1] != 'x' || (n - 2) % 2 != 0)
        return Py_NewRef(Py_None);
    PyObject *out = PyBytes_FromStringAndSize(NULL, (n - 2) / 2);
    if (out == NULL)
        return NULL;
    unsigned char *w = (unsigned char *)PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 2; i < n; i += 2) {
        int hi = hex_digit(s[i]), lo = hex_digit(s[i + 1]);
        if (hi < 0 || lo < 0) {
            Py_DECREF(out);
            return Py_NewRef(Py_None);
        }
        *w++ = (unsigned char)(hi << 4 | lo);
    }
    return out;
}

/* One text value by its mode: a new reference, Py_None (new) to decline the row, NULL with
 * an exception set when out of memory. */
static PyObject *
driver_value(int mode, const unsigned char *s, Py_ssize_t n)
{
    char w[32];
    Py_ssize_t got = 0;
    switch (mode) {
    case D_TEXT: {
        PyObject *text = PyUnicode_DecodeUTF8((const char *)s, n, NULL);
        if (text == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
            PyErr_Clear();
            return Py_NewRef(Py_None);
        }
        return text;
    }
    case D_INT:
        return driver_int(s, n);
    case D_FLOAT:
        return driver_float(s, n);
    case D_BOOL:
        if (n == 1 && (s[0] == 't' || s[0] == 'f'))
            return PyLong_FromLong(s[0] == 't');
        return Py_NewRef(Py_None);
    case D_BYTEA:
        return driver_bytea(s, n);
    case D_INT_ARRAY: {
        if (!all_ascii(s, n) || !int_array_chars(s, n) || n > PY_SSIZE_T_MAX / 2)
            return Py_NewRef(Py_None);
        char *out = PyMem_Malloc((size_t)(2 * n + 1));
        if (out == NULL)
            return PyErr_NoMemory();
        PyObject *json = PyUnicode_DecodeASCII(out, int_array_write(out, s, n, 1) - out, NULL);
        PyMem_Free(out);
        return json;
    }
    case D_TEXT_ARRAY: {
        Out o;
        out_init(&o);
        int done = out_array_json(&o, s, n, 1, ", ", 2);
        PyObject *json = done == 1   ? PyUnicode_DecodeASCII(o.buf, o.len, NULL)
                         : done == 0 ? Py_NewRef(Py_None)
                                     : NULL;
        PyMem_Free(o.heap);
        return json;
    }
    default:
        break;
    }
    if (!all_ascii(s, n))
        return Py_NewRef(Py_None);
    switch (mode) {
    case D_TIMESTAMP:
        got = edit_timestamp(w, s, n);
        break;
    case D_TIMESTAMPTZ:
        if (n >= 3 && memcmp(s + n - 3, "+00", 3) == 0)
            got = edit_timestamp(w, s, n - 3);
        break;
    case D_DATE:
        if (n == 10 && s[4] == '-' && s[7] == '-') {
            memcpy(w, s, 10);
            got = 10;
        }
        break;
    case D_TIME:
        got = edit_time(w, s, n);
        break;
    case D_TIMETZ: {
        Py_ssize_t cut = -1;
        for (Py_ssize_t i = 0; i < n; i++)
            if (s[i] == '+' || s[i] == '-')
                cut = i;
        if (cut >= 8)
            got = edit_time(w, s, cut);
        break;
    }
    case D_UUID:
        if (n == 36 && s[8] == '-')
            for (Py_ssize_t i = 0; i < n; i++)
                if (s[i] != '-')
                    w[got++] = (char)s[i];
        break;
    default:
        break;
    }
    if (got == 0)
        return Py_NewRef(Py_None);
    return PyUnicode_DecodeASCII(w, got, NULL);
}

/* The values of the TupleData at data[pos:] converted by plan (one entry per column: a D_
 * mode, or a callable(bytes) -> value) in a new tuple; Py_None (new) to decline: irregular
 * bytes, a binary or unchanged-TOAST value, a mode's refusal, a callable that raised an
 * Exception. */
static PyObject *
driver_values(PyObject *plan, const unsigned char *data, Py_ssize_t len, Py_ssize_t pos)
{
    Py_ssize_t ncols = PyTuple_GET_SIZE(plan);
    if (!read_count(data, len, pos, ncols))
        return Py_NewRef(Py_None);
    PyObject *row = PyTuple_New(ncols);
    if (row == NULL)
        return NULL;
    pos += 2;
    for (Py_ssize_t i = 0; i < ncols; i++) {
        int kind;
        Py_ssize_t start, size;
        PyObject *value;
        if (!next_value(data, len, &pos, &kind, &start, &size))
            goto declined;
        if (kind == KIND_NULL) {
            PyTuple_SET_ITEM(row, i, Py_NewRef(Py_None));
            continue;
        }
        if (kind != KIND_TEXT)
            goto declined;
        PyObject *entry = PyTuple_GET_ITEM(plan, i);
        if (PyLong_CheckExact(entry)) {
            long mode = PyLong_AsLong(entry);
            if (mode < 0 || mode > D_LAST)
                goto declined;
            value = driver_value((int)mode, data + start, size);
            if (value == Py_None) {
                Py_DECREF(value);
                goto declined;
            }
        }
        else {
            PyObject *bytes = PyBytes_FromStringAndSize((const char *)data + start, size);
            if (bytes == NULL)
                goto failed;
            value = PyObject_CallOneArg(entry, bytes);
            Py_DECREF(bytes);
            if (value == NULL && PyErr_ExceptionMatches(PyExc_Exception)) {
                PyErr_Clear(); /* a value the Python path names */
                goto declined;
            }
        }
        if (value == NULL)
            goto failed;
        PyTuple_SET_ITEM(row, i, value);
    }
    return row;
declined:
    Py_DECREF(row);
    return Py_NewRef(Py_None);
failed:
    Py_DECREF(row);
    return NULL;
}

/* driver_row(plan, buf, pos) -> tuple | None
 *
 * A text TupleData's values as the SQL sink's driver takes them, in column order, converted
 * by ``plan`` (driver_values); None where it declines, and the sink converts the row in
 * Python. The plan comes first for a functools.partial. */
static PyObject *
driver_row(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyTuple_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "driver_row(plan: tuple, buf, pos)");
        return NULL;
    }
    Py_ssize_t pos;
    Py_buffer view;
    if (!buffer_at(args[1], args[2], &view, &pos))
        return NULL;
    PyObject *row = driver_values(args[0], view.buf, view.len, pos);
    PyBuffer_Release(&view);
    return row;
}

/* driver_dict(template, plan, buf, pos) -> dict | None
 *
 * driver_row's values as {column: value}: ``template`` is dict.fromkeys(column names) (see
 * typed_row), in the plan's order. */
static PyObject *
driver_dict(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyDict_CheckExact(args[0]) || !PyTuple_Check(args[1]) ||
        PyDict_GET_SIZE(args[0]) != PyTuple_GET_SIZE(args[1])) {
        PyErr_SetString(PyExc_TypeError, "driver_dict(template: dict, plan: tuple, buf, pos)");
        return NULL;
    }
    PyObject *values = driver_row(self, args + 1, 3);
    if (values == NULL || values == Py_None)
        return values;
    PyObject *template = args[0];
    PyObject *row = PyDict_Copy(template);
    PyObject *key, *unused;
    Py_ssize_t at = 0, i = 0, ncols = PyTuple_GET_SIZE(values);
    while (row != NULL && PyDict_Next(template, &at, &key, &unused)) {
        if (i >= ncols || PyDict_SetItem(row, key, PyTuple_GET_ITEM(values, i++)) < 0) {
            Py_CLEAR(row);
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_RuntimeError, "driver_dict: template changed size");
        }
    }
    Py_DECREF(values);
    return row;
}

static PyMethodDef methods[] = {
    {"bind_held", (PyCFunction)(void (*)(void))bind_held, METH_FASTCALL,
     PyDoc_STR("bind_held(cls, fields): where hold_rows puts a Held's fields")},
    {"hold_rows", (PyCFunction)(void (*)(void))hold_rows, METH_FASTCALL,
     PyDoc_STR("hold_rows(targets, held, tables, transitions, merge, changes, start, room)")},
    {"driver_row", (PyCFunction)(void (*)(void))driver_row, METH_FASTCALL,
     PyDoc_STR("driver_row(plan, buf, pos) -> tuple | None: driver values of a TupleData")},
    {"driver_dict", (PyCFunction)(void (*)(void))driver_dict, METH_FASTCALL,
     PyDoc_STR("driver_dict(template, plan, buf, pos) -> dict | None")},
    {"bind_row_change", (PyCFunction)(void (*)(void))bind_row_change, METH_FASTCALL,
     PyDoc_STR("bind_row_change(cls, fields): where row_change puts each field")},
    {"row_change", (PyCFunction)(void (*)(void))row_change, METH_FASTCALL,
     PyDoc_STR("row_change(relations, payload, pos) -> RowChange | None")},
    {"pump_rows", (PyCFunction)(void (*)(void))pump_rows, METH_FASTCALL,
     PyDoc_STR("pump_rows(get_copy_data, relations, changes, limit) -> (taken, last, pending)")},
    {"put_row", (PyCFunction)(void (*)(void))put_row, METH_FASTCALL,
     PyDoc_STR("put_row(relations, changes, message) -> bool")},
    {"copy_row", (PyCFunction)(void (*)(void))copy_row, METH_FASTCALL,
     PyDoc_STR("copy_row(line, ncols) -> list | None")},
    {"digit_run", (PyCFunction)(void (*)(void))digit_run, METH_FASTCALL,
     PyDoc_STR("digit_run(data, length) -> bool: length ASCII digits in a row")},
    {"ipv4_int", (PyCFunction)(void (*)(void))ipv4_int, METH_FASTCALL,
     PyDoc_STR("ipv4_int(data) -> int | None: a dotted quad's integer")},
    {"int_array_json", (PyCFunction)(void (*)(void))int_array_json, METH_FASTCALL,
     PyDoc_STR("int_array_json(text) -> str (ValueError: not an integer array)")},
    {"text_array_json", (PyCFunction)(void (*)(void))text_array_json, METH_FASTCALL,
     PyDoc_STR("text_array_json(text, ascii, separator) -> str | None")},
    {"copy_text", (PyCFunction)(void (*)(void))copy_text, METH_FASTCALL,
     PyDoc_STR("copy_text(ncols, buf, pos) -> bytes | None: a TupleData as COPY text")},
    {"row_key", (PyCFunction)(void (*)(void))row_key, METH_FASTCALL,
     PyDoc_STR("row_key(indexes, ncols, buf, pos) -> (key, complete) | None")},
    {"typed_row", (PyCFunction)(void (*)(void))typed_row, METH_FASTCALL,
     PyDoc_STR("typed_row(template, load_text_row, load_binary_row, buf, pos) -> dict | None")},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pglogrepl_bridge._fastrow",
    .m_doc = PyDoc_STR("C walks over pgoutput TupleData; see rowcompile.py and relcache.py."),
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__fastrow(void)
{
    if (PyType_Ready(&JsonRowType) < 0)
        return NULL;
    op_insert = PyUnicode_InternFromString("insert");
    op_update = PyUnicode_InternFromString("update");
    op_delete = PyUnicode_InternFromString("delete");
    kind_key = PyUnicode_InternFromString("K");
    kind_old = PyUnicode_InternFromString("O");
    str_hold = PyUnicode_InternFromString("hold");
    if (!op_insert || !op_update || !op_delete || !kind_key || !kind_old || !str_hold)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "JsonRow", (PyObject *)&JsonRowType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
