/*
 * kvmnet-hook: the qemu ifup/ifdown hooks' client for kvmnetd's control socket.
 *
 *   kvmnet-hook attach IFNAME [NETWORK]    AttachPort(IFNAME, NETWORK, false)
 *   kvmnet-hook detach IFNAME              DetachPort(IFNAME)
 *
 * The hook runs once per guest start, and qemu waits for it: a shell plus dbus-send
 * costs more than the attach itself, and Python's start-up far more. This speaks the
 * socket's one-line JSON protocol (docs/control.md) and nothing else. The daemon
 * judges the caller by SO_PEERCRED, as for kvmnetctl.
 *
 * Socket: $KVMNETD_SOCKET, else /run/kvmnetd/control.sock.
 * Exit: 0 done; 1 refused (on stderr: "Error NAME: message", as dbus-send prints it);
 * 2 usage; 3 no daemon to ask (the caller may try the bus).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define DEFAULT_SOCKET "/run/kvmnetd/control.sock"
#define MAX_NAME 256

/* Append s as a JSON string; names are checked by the daemon, this only keeps the
 * line well formed whatever it is given. */
static int put_string(char *out, size_t cap, size_t *len, const char *s)
{
    if (strlen(s) > MAX_NAME)
        return -1;
    if (*len + 2 + 6 * strlen(s) + 1 > cap)
        return -1;
    out[(*len)++] = '"';
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\') {
            out[(*len)++] = '\\';
            out[(*len)++] = (char)*p;
        } else if (*p < 0x20) {
            *len += (size_t)snprintf(out + *len, cap - *len, "\\u%04x", *p);
        } else {
            out[(*len)++] = (char)*p;
        }
    }
    out[(*len)++] = '"';
    out[*len] = '\0';
    return 0;
}

/* The value of a string member of the reply, unescaped enough for a message. */
static void get_string(const char *reply, const char *key, char *out, size_t cap)
{
    char pattern[32];
    snprintf(pattern, sizeof(pattern), "\"%s\":", key);
    const char *p = strstr(reply, pattern);
    size_t n = 0;
    if (p != NULL) {
        for (p += strlen(pattern); *p == ' '; p++)
            ;
    }
    if (p != NULL && *p == '"') {
        for (p++; *p && *p != '"' && n + 1 < cap; p++) {
            if (*p == '\\' && p[1] != '\0')
                p++;
            out[n++] = *p;
        }
    }
    out[n] = '\0';
}

static int usage(void)
{
    fputs("usage: kvmnet-hook attach IFNAME [NETWORK] | kvmnet-hook detach IFNAME\n", stderr);
    return 2;
}

int main(int argc, char **argv)
{
    char line[4096];
    size_t len = 0;
    int attach;

    if (argc >= 3 && argc <= 4 && strcmp(argv[1], "attach") == 0)
        attach = 1;
    else if (argc == 3 && strcmp(argv[1], "detach") == 0)
        attach = 0;
    else
        return usage();

    len = (size_t)snprintf(line, sizeof(line), "{\"method\": \"%s\", \"args\": [",
                           attach ? "AttachPort" : "DetachPort");
    if (put_string(line, sizeof(line), &len, argv[2]) < 0)
        return usage();
    if (attach) {
        line[len++] = ',';
        if (put_string(line, sizeof(line), &len, argc == 4 ? argv[3] : "") < 0)
            return usage();
        len += (size_t)snprintf(line + len, sizeof(line) - len, ", false");
    }
    len += (size_t)snprintf(line + len, sizeof(line) - len, "]}\n");

    const char *path = getenv("KVMNETD_SOCKET");
    if (path == NULL || *path == '\0')
        path = DEFAULT_SOCKET;
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof(addr.sun_path)) {
        fprintf(stderr, "kvmnet-hook: socket path too long: %s\n", path);
        return 2;
    }
    strcpy(addr.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
        fprintf(stderr, "kvmnet-hook: cannot reach kvmnetd at %s: %s\n", path, strerror(errno));
        return 3;
    }
    for (size_t off = 0; off < len;) {
        ssize_t n = write(fd, line + off, len - off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            fprintf(stderr, "kvmnet-hook: lost kvmnetd at %s: %s\n", path, strerror(errno));
            return 3;
        }
        off += (size_t)n;
    }

    char reply[8192];
    size_t got = 0;
    while (got + 1 < sizeof(reply)) {
        ssize_t n = read(fd, reply + got, sizeof(reply) - 1 - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
        if (memchr(reply + got - (size_t)n, '\n', (size_t)n) != NULL)
            break;
    }
    reply[got] = '\0';
    close(fd);
    if (got == 0 || reply[got - 1] != '\n') {
        fprintf(stderr, "kvmnet-hook: no reply from kvmnetd at %s\n", path);
        return 3;
    }
    if (strstr(reply, "\"ok\":true") != NULL || strstr(reply, "\"ok\": true") != NULL)
        return 0;
    char name[256], message[4096];
    get_string(reply, "error", name, sizeof(name));
    get_string(reply, "message", message, sizeof(message));
    fprintf(stderr, "Error %s: %s\n", name, message);
    return 1;
}
