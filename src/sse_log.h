/* Log levels of the core's log hooks (the binding names them "error" ... "debug"). */
#ifndef SSE_LOG_H
#define SSE_LOG_H

enum { SSE_LOG_ERROR = 0, SSE_LOG_WARN = 1, SSE_LOG_INFO = 2, SSE_LOG_DEBUG = 3 };

#endif
