/* Prints, as JSON, what the Python binding (python/ckpt_engine/_lib.py, ctypes) must agree
 * with: the size, alignment and every field's offset, size and kind of the structs it
 * declares, the dtype table and the constants it copies. tests/python/test_layout.py
 * compares the two; a struct or field the binding declares must appear here.
 *
 * Kinds: "i32", "u64", "char", "ptr", ... for scalars, "KIND[N]" for arrays, the C type
 * name for a nested struct. */
#include <stddef.h>
#include <stdio.h>

#include "ckpt/ckpt.h"
#include "ckpt/layout.h"
#include "ckpt/publish.h"
#include "ckpt/receiver.h"

/* The kind of an lvalue's type. Arrays decay here, so ARRAY() asks for an element's kind;
 * FIELD() on an array gives "ptr", which then disagrees with the binding's "KIND[N]". */
#define KIND(x)                                                                              \
    _Generic((x),                                                                            \
        _Bool: "bool", char: "char", signed char: "i8", unsigned char: "u8", short: "i16",   \
        unsigned short: "u16", int: "i32", unsigned int: "u32", long: "i64",                 \
        unsigned long: "u64", long long: "i64", unsigned long long: "u64", float: "f32",     \
        double: "f64", ckpt_tensor_meta_t: "ckpt_tensor_meta_t", default: "ptr")

_Static_assert(sizeof(long) == 8, "KIND() maps long to i64: an LP64 platform is assumed");

static int first;

static void begin_struct(const char *name, size_t size, size_t align, int comma)
{
    printf("%s\n    \"%s\": {\"size\": %zu, \"align\": %zu, \"fields\": [", comma ? "," : "",
           name, size, align);
    first = 1;
}

static void field(const char *name, size_t offset, size_t size, const char *kind, size_t count)
{
    printf("%s\n      {\"name\": \"%s\", \"offset\": %zu, \"size\": %zu, \"kind\": \"%s",
           first ? "" : ",", name, offset, size, kind);
    if (count)
        printf("[%zu]", count);
    printf("\"}");
    first = 0;
}

#define STRUCT(T, comma) begin_struct(#T, sizeof(T), _Alignof(T), comma)
#define FIELD(T, f) field(#f, offsetof(T, f), sizeof(((T *)0)->f), KIND(((T *)0)->f), 0)
#define ARRAY(T, f)                                                                          \
    field(#f, offsetof(T, f), sizeof(((T *)0)->f), KIND(((T *)0)->f[0]),                    \
          sizeof(((T *)0)->f) / sizeof(((T *)0)->f[0]))
#define END_STRUCT() printf("\n    ]}")

int main(void)
{
    printf("{\n  \"structs\": {");
    STRUCT(ckpt_tensor_meta_t, 0);
    ARRAY(ckpt_tensor_meta_t, name);
    FIELD(ckpt_tensor_meta_t, dtype);
    FIELD(ckpt_tensor_meta_t, ndim);
    ARRAY(ckpt_tensor_meta_t, shape);
    FIELD(ckpt_tensor_meta_t, nbytes);
    FIELD(ckpt_tensor_meta_t, offset);
    FIELD(ckpt_tensor_meta_t, checksum);
    FIELD(ckpt_tensor_meta_t, owner);
    FIELD(ckpt_tensor_meta_t, reserved);
    END_STRUCT();

    STRUCT(ckpt_update_info_t, 1);
    FIELD(ckpt_update_info_t, update_id);
    FIELD(ckpt_update_info_t, version);
    ARRAY(ckpt_update_info_t, name);
    FIELD(ckpt_update_info_t, nbuckets);
    FIELD(ckpt_update_info_t, verify);
    FIELD(ckpt_update_info_t, stable);
    FIELD(ckpt_update_info_t, partial);
    FIELD(ckpt_update_info_t, manifest_count);
    END_STRUCT();

    STRUCT(ckpt_need_decl_t, 1);
    ARRAY(ckpt_need_decl_t, name);
    FIELD(ckpt_need_decl_t, dim);
    FIELD(ckpt_need_decl_t, reserved);
    FIELD(ckpt_need_decl_t, start);
    FIELD(ckpt_need_decl_t, length);
    END_STRUCT();

    STRUCT(ckpt_parallel_layout_t, 1);
    FIELD(ckpt_parallel_layout_t, tp);
    FIELD(ckpt_parallel_layout_t, pp);
    FIELD(ckpt_parallel_layout_t, ep);
    FIELD(ckpt_parallel_layout_t, num_layers);
    FIELD(ckpt_parallel_layout_t, num_experts);
    FIELD(ckpt_parallel_layout_t, kv_heads);
    END_STRUCT();

    STRUCT(ckpt_tensor_view_t, 1);
    FIELD(ckpt_tensor_view_t, meta);
    FIELD(ckpt_tensor_view_t, data);
    FIELD(ckpt_tensor_view_t, part_dim);
    FIELD(ckpt_tensor_view_t, memory);
    FIELD(ckpt_tensor_view_t, part_start);
    FIELD(ckpt_tensor_view_t, part_full);
    END_STRUCT();

    STRUCT(ckpt_publish_options_t, 1);
    FIELD(ckpt_publish_options_t, field_mask);
    FIELD(ckpt_publish_options_t, part);
    FIELD(ckpt_publish_options_t, nparts);
    FIELD(ckpt_publish_options_t, step);
    FIELD(ckpt_publish_options_t, wait);
    FIELD(ckpt_publish_options_t, timeout_ms);
    END_STRUCT();

    STRUCT(ckpt_publish_reply_t, 1);
    FIELD(ckpt_publish_reply_t, status);
    FIELD(ckpt_publish_reply_t, registered);
    FIELD(ckpt_publish_reply_t, version);
    ARRAY(ckpt_publish_reply_t, text);
    END_STRUCT();
    printf("\n  },\n");

    printf("  \"dtypes\": {");
    int ndtypes = 0;
#define DTYPE_JSON(name, value, size)                                                        \
    printf("%s\"%s\": [%d, %d]", ndtypes++ ? ", " : "", #name, value, size);
    CKPT_DTYPE_MAP(DTYPE_JSON)
#undef DTYPE_JSON
    printf("},\n");

    printf("  \"constants\": {\"CKPT_NAME_MAX\": %d, \"CKPT_MAX_DIMS\": %d, "
           "\"CKPT_RECV_BUCKET\": %d, \"CKPT_RECV_FINISH\": %d, \"CKPT_RECV_ABORT\": %d}\n}\n",
           CKPT_NAME_MAX, CKPT_MAX_DIMS, CKPT_RECV_BUCKET, CKPT_RECV_FINISH, CKPT_RECV_ABORT);
    return 0;
}
