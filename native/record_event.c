/* record_events: a verified commit's record events, made in C.
 *
 * repo_stream.sync.service.record_events is the reference: for each op of a VerifiedCommit (the
 * tuples (action, path, cid, prev, value, block)), a RecordEvent(did, rev, seq, action,
 * collection, rkey, cid text, live=True, value_text=value) and the pair (path, cid text). The
 * events are made as RecordEvent.__init__ makes them (its slots set, __init__ not called: it
 * only stores its arguments), from the class's slot descriptors, checked when bound.
 *
 * The input is the C pass's own output (a verified commit), not network bytes; still every item
 * is type-checked before use, and anything not of the usual shape is a TypeError. The ops are
 * read from a tuple (a list is copied first): reading a CID's cid_bytes, or rs_cid_text_of's fallback for a CID
 * that is not a CIDv1 (never one of a verified commit), may run Python code. */
#include "native.h"

#include <structmember.h>

#define FIELDS 10
static const char *const NAMES[FIELDS] = {"did", "rev", "seq", "action", "collection", "rkey", "cid", "live", "_value", "value_text"};
enum { F_DID, F_REV, F_SEQ, F_ACTION, F_COLLECTION, F_RKEY, F_CID, F_LIVE, F_VALUE, F_TEXT };

static PyTypeObject *bound = NULL; /* the class whose slot offsets are in offsets[] (a reference held) */
static Py_ssize_t offsets[FIELDS];
static PyObject *cid_bytes_name = NULL;

/* Read the slot offsets of cls (each name a writable object slot of cls itself). 0, or -1. */
static int bind(PyObject *cls) {
    if (bound == (PyTypeObject *)cls) return 0;
    if (!PyType_Check(cls)) {
        PyErr_SetString(PyExc_TypeError, "record_events(): cls must be a class");
        return -1;
    }
    Py_ssize_t found[FIELDS];
    for (int i = 0; i < FIELDS; i++) {
        PyObject *d = PyDict_GetItemString(((PyTypeObject *)cls)->tp_dict, NAMES[i]); /* borrowed */
        if (d == NULL || Py_TYPE(d) != &PyMemberDescr_Type) {
            PyErr_Format(PyExc_TypeError, "record_events(): %s has no slot %s", ((PyTypeObject *)cls)->tp_name, NAMES[i]);
            return -1;
        }
        PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
        if (m->type != T_OBJECT_EX || (m->flags & READONLY) || m->offset <= 0 || (size_t)m->offset + sizeof(PyObject *) > (size_t)((PyTypeObject *)cls)->tp_basicsize) {
            PyErr_Format(PyExc_TypeError, "record_events(): slot %s of %s is not a writable object slot", NAMES[i], ((PyTypeObject *)cls)->tp_name);
            return -1;
        }
        found[i] = m->offset;
    }
    if (((PyTypeObject *)cls)->tp_dictoffset != 0 || ((PyTypeObject *)cls)->tp_itemsize != 0) {
        PyErr_Format(PyExc_TypeError, "record_events(): %s must have __slots__ only", ((PyTypeObject *)cls)->tp_name);
        return -1;
    }
    if (cid_bytes_name == NULL && (cid_bytes_name = PyUnicode_InternFromString("cid_bytes")) == NULL) return -1;
    memcpy(offsets, found, sizeof offsets);
    Py_INCREF(cls);
    Py_XSETREF(bound, (PyTypeObject *)cls);
    return 0;
}

/* A new instance of the bound class with these field values (each a new reference taken). */
static PyObject *make_event(PyObject *const values[FIELDS]) {
    PyObject *e = bound->tp_alloc(bound, 0);
    if (e == NULL) return NULL;
    for (int i = 0; i < FIELDS; i++) {
        PyObject **slot = (PyObject **)((char *)e + offsets[i]);
        Py_INCREF(values[i]);
        Py_XSETREF(*slot, values[i]);
    }
    return e;
}

/* record_events(cls, unset, did, rev, seq, ops) -> (deliveries, records): deliveries a list of
 * (event, None), records a list of (path, cid text or None). */
PyObject *rs_record_events(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 6) {
        PyErr_Format(PyExc_TypeError, "record_events() takes 6 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *cls = args[0], *unset = args[1], *did = args[2], *rev = args[3], *seq = args[4], *ops = args[5];
    if (bind(cls) < 0) return NULL;
    if (!PyUnicode_Check(did) || !PyUnicode_Check(rev) || !(PyTuple_Check(ops) || PyList_Check(ops))) {
        PyErr_SetString(PyExc_TypeError, "record_events(): did and rev must be str, ops a tuple or a list");
        return NULL;
    }
    /* a tuple (a VerifiedCommit's), or a copy of a list: reading a CID's bytes could run Python
     * code (an attribute of another class) that changes the caller's list */
    PyObject *held = PyTuple_Check(ops) ? Py_NewRef(ops) : PyList_AsTuple(ops);
    if (held == NULL) return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(held);
    PyObject *deliveries = PyList_New(n), *records = PyList_New(n), *out = NULL;
    if (deliveries == NULL || records == NULL) goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *op = PyTuple_GET_ITEM(held, i); /* borrowed: held holds it */
        if (!PyTuple_Check(op) || PyTuple_GET_SIZE(op) != 6) {
            PyErr_Format(PyExc_TypeError, "record_events(): op %zd is not a 6-tuple", i);
            goto done;
        }
        PyObject *action = PyTuple_GET_ITEM(op, 0), *path = PyTuple_GET_ITEM(op, 1), *link = PyTuple_GET_ITEM(op, 2), *text = PyTuple_GET_ITEM(op, 4);
        if (!PyUnicode_Check(action) || !PyUnicode_Check(path) || !(text == Py_None || PyUnicode_Check(text))) {
            PyErr_Format(PyExc_TypeError, "record_events(): op %zd: action and path must be str, value a str or None", i);
            goto done;
        }
        /* path.partition("/") */
        Py_ssize_t len = PyUnicode_GET_LENGTH(path);
        Py_ssize_t slash = PyUnicode_FindChar(path, '/', 0, len, 1);
        if (slash == -2) goto done;
        PyObject *collection = slash < 0 ? Py_NewRef(path) : PyUnicode_Substring(path, 0, slash);
        PyObject *rkey = slash < 0 ? PyUnicode_New(0, 0) : PyUnicode_Substring(path, slash + 1, len);
        PyObject *cid = NULL;
        if (collection == NULL || rkey == NULL) {
            Py_XDECREF(collection);
            Py_XDECREF(rkey);
            goto done;
        }
        if (link == Py_None) {
            cid = Py_NewRef(Py_None);
        } else {
            PyObject *raw = PyObject_GetAttr(link, cid_bytes_name);
            if (raw != NULL && !PyBytes_Check(raw)) {
                Py_DECREF(raw);
                raw = NULL;
                PyErr_Format(PyExc_TypeError, "record_events(): op %zd: the CID's cid_bytes is not bytes", i);
            }
            if (raw != NULL) {
                cid = rs_cid_text_of((const uint8_t *)PyBytes_AS_STRING(raw), (size_t)PyBytes_GET_SIZE(raw));
                Py_DECREF(raw);
            }
        }
        PyObject *event = NULL, *delivery = NULL, *record = NULL;
        if (cid != NULL) {
            /* RecordEvent.__init__: _value is None with no value_text, else the unset marker */
            PyObject *values[FIELDS] = {did, rev, seq, action, collection, rkey, cid, Py_True, text == Py_None ? Py_None : unset, text};
            event = make_event(values);
        }
        if (event != NULL) delivery = PyTuple_Pack(2, event, Py_None);
        if (delivery != NULL) record = PyTuple_Pack(2, path, cid);
        Py_XDECREF(event);
        Py_DECREF(collection);
        Py_DECREF(rkey);
        Py_XDECREF(cid);
        if (record == NULL) {
            Py_XDECREF(delivery);
            goto done;
        }
        PyList_SET_ITEM(deliveries, i, delivery);
        PyList_SET_ITEM(records, i, record);
    }
    out = PyTuple_Pack(2, deliveries, records);
done:
    /* a list's unset slots are NULL: Py_DECREF of a list skips them */
    Py_DECREF(held);
    Py_XDECREF(deliveries);
    Py_XDECREF(records);
    return out;
}
