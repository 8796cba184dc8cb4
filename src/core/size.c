/* Human byte sizes: parsing for command-line options, formatting for reports. */
#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <strings.h>

#include "core/internal.h"

int ckpt_parse_size(const char *text, uint64_t *bytes_out)
{
    static const struct { const char *suffix; double mult; } units[] = {
        {"", 1}, {"b", 1},
        {"k", 1024.0}, {"kb", 1024.0}, {"kib", 1024.0},
        {"m", 1048576.0}, {"mb", 1048576.0}, {"mib", 1048576.0},
        {"g", 1073741824.0}, {"gb", 1073741824.0}, {"gib", 1073741824.0},
        {"t", 1099511627776.0}, {"tb", 1099511627776.0}, {"tib", 1099511627776.0},
    };
    if (text == NULL || !isdigit((unsigned char)text[0]))
        return ckpt__error(CKPT_EINVAL, "'%s' is not a size (try 512MiB, 2GiB or 1048576)",
                           text ? text : "(null)");
    char *end;
    double v = strtod(text, &end);
    for (size_t i = 0; i < CKPT_ARRAY_SIZE(units); i++) {
        if (strcasecmp(end, units[i].suffix) == 0) {
            double bytes = v * units[i].mult;
            if (!isfinite(bytes) || bytes >= 1.8e19)
                return ckpt__error(CKPT_ETOOBIG, "size '%s' is too large", text);
            *bytes_out = (uint64_t)bytes;
            return CKPT_OK;
        }
    }
    return ckpt__error(CKPT_EINVAL, "'%s' has an unknown unit (use B, KiB, MiB, GiB or TiB)",
                       text);
}

const char *ckpt_format_size(uint64_t bytes, char *buf, size_t cap)
{
    static const char *names[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    double v = (double)bytes;
    size_t u = 0;
    while (v >= 1024.0 && u + 1 < CKPT_ARRAY_SIZE(names)) {
        v /= 1024.0;
        u++;
    }
    if (u == 0)
        snprintf(buf, cap, "%llu B", (unsigned long long)bytes);
    else
        snprintf(buf, cap, "%.2f %s", v, names[u]);
    return buf;
}
