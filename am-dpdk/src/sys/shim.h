/* The DPDK API am-dpdk binds (bindgen reads this file) and the C shim for DPDK's
 * `static inline` fast-path functions, which have no symbol to link against. */
#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_lcore.h>
#include <rte_ethdev.h>
#include <rte_mbuf.h>
#include <rte_mempool.h>
#include <rte_ring.h>
#include <rte_eth_ring.h>
#include <rte_bus_vdev.h>
#include <rte_epoll.h>

int am_shim_errno(void);
uint16_t am_shim_rx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n);
uint16_t am_shim_tx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n);
struct rte_mbuf *am_shim_alloc(struct rte_mempool *pool);
void am_shim_free(struct rte_mbuf *m);
void am_shim_free_bulk(struct rte_mbuf **pkts, unsigned int n);
uint8_t *am_shim_data(struct rte_mbuf *m);
uint16_t am_shim_data_len(const struct rte_mbuf *m);
uint32_t am_shim_pkt_len(const struct rte_mbuf *m);
uint16_t am_shim_nb_segs(const struct rte_mbuf *m);
uint16_t am_shim_tailroom(const struct rte_mbuf *m);
uint8_t *am_shim_append(struct rte_mbuf *m, uint16_t len);
void am_shim_tx_ipv4_cksum(struct rte_mbuf *m, uint16_t l2_len, uint16_t l3_len);
/* 0: the port did not check the IPv4 header checksum, 1: good, 2: bad. */
int am_shim_rx_ip_cksum(const struct rte_mbuf *m);
unsigned int am_shim_ring_enqueue_burst(struct rte_ring *r, struct rte_mbuf **pkts, unsigned int n);
unsigned int am_shim_ring_dequeue_burst(struct rte_ring *r, struct rte_mbuf **pkts, unsigned int n);
unsigned int am_shim_ring_count(const struct rte_ring *r);
